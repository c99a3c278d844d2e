"""Ablations run one thread per process: cases are tiny-model decodes, and under pytest-xdist two workers
share two cores; oversubscribed threads would make timings noise.

The cascade family's fixture lives here: `cascade_case` (dflash.cascade.ablation.CascadeCase), parametrized over
the run's profiles that have a cascade profile of the same name; so is the Fast-dLLM v2 family's `fastdllm_case`
(dflash.blockdiffusion.ablation.FastDLLMCase)."""
import pytest
import torch

from dflash.harness.plugin import STATE, ablation_problem

torch.set_num_threads(1)


def pytest_generate_tests(metafunc):
    if "cascade_case" in metafunc.fixturenames:
        from dflash.cascade.ablation import cascade_profiles
        names = cascade_profiles(metafunc.config.stash[STATE].profiles)
        metafunc.parametrize("cascade_case", [pytest.param(n, id=n) for n in names], indirect=True)
    if "fastdllm_case" in metafunc.fixturenames:
        from dflash.blockdiffusion.ablation import fastdllm_profiles
        names = fastdllm_profiles(metafunc.config.stash[STATE].profiles)
        metafunc.parametrize("fastdllm_case", [pytest.param(n, id=n) for n in names], indirect=True)


def family_case(request, case_class, family_profile):
    """A case object of a family with profiles of its own (cascade, Fast-dLLM v2): checked marker, --resume's
    record, or a one-line skip where the family's profile cannot run here."""
    state = request.config.stash[STATE]
    problem = ablation_problem(request.node)
    if request.node.get_closest_marker("ablation") is None or problem:
        pytest.fail(f"{request.node.nodeid}: {problem or 'needs @pytest.mark.ablation(name)'}", pytrace=False)
    made = case_class(request, state, state.profile(request.param), family_profile)
    if request.config.getoption("resume"):
        made.recorded = state.recorded(request.param).get(made.experiment_id)
        if made.recorded is not None:
            return made
    reason = family_profile.unavailable()
    if reason:
        pytest.skip(f"{case_class.display_name} profile {request.param}: {reason}")
    return made


@pytest.fixture
def cascade_case(request):
    from dflash.cascade.ablation import CascadeCase
    from dflash.cascade.profiles import get_profile
    return family_case(request, CascadeCase, get_profile(request.param))


@pytest.fixture
def fastdllm_case(request):
    from dflash.blockdiffusion.ablation import FastDLLMCase
    from dflash.blockdiffusion.profiles import get_profile
    return family_case(request, FastDLLMCase, get_profile(request.param))
