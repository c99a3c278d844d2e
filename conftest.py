"""Project-wide pytest configuration: hypothesis profiles (derandomized, no deadline, in CI) and the ablation
plugin (options --profile, --report, --update-baselines, --resume; fixtures; gates)."""
import os

from hypothesis import HealthCheck, settings

pytest_plugins = ["dflash.plugin"]

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
