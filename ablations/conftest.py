"""Ablations run one thread per process: cases are tiny-model decodes, and under pytest-xdist two workers
share two cores; oversubscribed threads would make timings noise.

The cascade family's fixture lives here: `cascade_case` (dflash.cascade.ablation.CascadeCase), parametrized over
the run's profiles that have a cascade profile of the same name."""
import pytest
import torch

from dflash.harness.plugin import STATE, ablation_problem

torch.set_num_threads(1)


def pytest_generate_tests(metafunc):
    if "cascade_case" in metafunc.fixturenames:
        from dflash.cascade.ablation import cascade_profiles
        names = cascade_profiles(metafunc.config.stash[STATE].profiles)
        metafunc.parametrize("cascade_case", [pytest.param(n, id=n) for n in names], indirect=True)


@pytest.fixture
def cascade_case(request):
    from dflash.cascade.ablation import CascadeCase
    from dflash.cascade.profiles import get_profile
    state = request.config.stash[STATE]
    problem = ablation_problem(request.node)
    if request.node.get_closest_marker("ablation") is None or problem:
        pytest.fail(f"{request.node.nodeid}: {problem or 'needs @pytest.mark.ablation(name)'}", pytrace=False)
    made = CascadeCase(request, state, state.profile(request.param))
    if request.config.getoption("resume"):
        made.recorded = state.recorded(request.param).get(made.experiment_id)
        if made.recorded is not None:
            return made
    reason = get_profile(request.param).unavailable()
    if reason:
        pytest.skip(f"cascade profile {request.param}: {reason}")
    return made
