"""The private members of Pyro (and the deprecated torch API) that pyrovae relies on.

pyproject.toml pins pyro-ppl to 1.9.x because of them. A Pyro release that renames
one fails here with a message naming the member and the pyrovae module that needs
it, rather than somewhere deep in training, or (for an override that Pyro no longer
calls) not at all: a renamed ``_get_trace`` would silently turn the STL estimator
back into the standard one.
"""

import pyro
import pyro.distributions as dist
import pyro.ops.jit
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import PyroOptim


def model(x):
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):
    loc = pyro.param("loc", torch.tensor(0.3))
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(loc, 1.0))


X = torch.tensor([0.5, -1.0, 2.0])


@pytest.mark.filterwarnings("ignore:.*torch.jit.trace.*:FutureWarning")
def test_compiled_function_records_its_param_names():
    # pyrovae/objectives/compiled.py reads graph._param_names to record a graph again
    # after the param store was cleared
    def fn(x):
        return pyro.param("weight", torch.ones(3)) * x

    graph = pyro.ops.jit.trace(fn)
    graph(X)
    where = ("pyro.ops.jit.CompiledFunction._param_names, which pyrovae/objectives/compiled.py "
             "(CompiledTerms._graph) reads")
    assert isinstance(graph, pyro.ops.jit.CompiledFunction), f"{where}: trace returned {graph!r}"
    assert hasattr(graph, "_param_names"), f"{where}, is gone"
    assert list(graph._param_names) == ["weight"], f"{where}, no longer holds the param names"


def test_pyro_optim_keeps_the_state_set_for_later():
    # pyrovae/svi.py (FusedOptim._add) pops each parameter's saved state from
    # _state_waiting_to_be_consumed, in Pyro's format {"state": {0: ...}}
    where = ("pyro.optim.PyroOptim._state_waiting_to_be_consumed, which pyrovae/svi.py "
             "(FusedOptim._add) reads")
    optim = pyro.optim.Adam({"lr": 0.1})
    assert isinstance(optim, PyroOptim)
    assert isinstance(getattr(optim, "_state_waiting_to_be_consumed", None), dict), \
        f"{where}, is gone or no longer a dict"
    pyro.param("w", torch.ones(2))
    saver = pyro.optim.Adam({"lr": 0.1})
    pyro.param("w").unconstrained().grad = torch.ones(2)
    saver([pyro.param("w").unconstrained()])
    optim.set_state(saver.get_state())
    waiting = optim._state_waiting_to_be_consumed
    assert set(waiting) == {"w"}, f"{where}, is not filled by set_state: {waiting!r}"
    assert {"step", "exp_avg", "exp_avg_sq"} <= set(waiting["w"]["state"][0]), \
        f"{where}, holds the state in another format: {waiting!r}"


def test_pyro_optim_keeps_the_torch_constructor_and_its_arguments():
    # not underscored, but undocumented: pyrovae/svi.py (FusedOptim) builds its one
    # torch optimizer from them
    optim = PyroOptim(torch.optim.Adam, {"lr": 0.1, "fused": True})
    for member, value in (("pt_optim_constructor", torch.optim.Adam),
                          ("pt_optim_args", {"lr": 0.1, "fused": True})):
        assert getattr(optim, member, None) == value, \
            f"pyro.optim.PyroOptim.{member}, which pyrovae/svi.py (FusedOptim) reads, is gone"


def spy_on(cls, member):
    """A subclass of ``cls`` whose ``member`` records its calls and return values."""
    calls = []
    original = getattr(cls, member)

    def spy(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(result)
        return result

    return type(f"Spy{cls.__name__}", (cls,), {member: spy}), calls


# (Pyro class, private method, the public entry point that must call it, who overrides it)
OVERRIDDEN = [
    (Trace_ELBO, "_get_trace", {},
     "pyrovae/objectives/elbos.py (Objective: --estimator stl and dreg)"),
    (TraceMeanField_ELBO, "_get_trace", {},
     "pyrovae/objectives/elbos.py (Objective: --estimator stl and dreg)"),
    (RenyiELBO, "_get_trace", dict(alpha=0, num_particles=2, vectorize_particles=True),
     "pyrovae/objectives/elbos.py (Objective, in IWAE_ELBO: --estimator stl and dreg)"),
    (RenyiELBO, "_get_traces", dict(alpha=0, num_particles=2, vectorize_particles=True),
     "pyrovae/objectives/elbos.py (IWAE_ELBO: the recorded terms, the log weights)"),
    (Trace_ELBO, "_differentiable_loss_particle", {},
     "pyrovae/objectives/elbos.py (RecordsTerms, KLWeightedELBO) and "
     "pyrovae/objectives/compiled.py (CompiledTrace_ELBO)"),
    (TraceMeanField_ELBO, "_differentiable_loss_particle", {},
     "pyrovae/objectives/elbos.py (RecordsTerms) and pyrovae/objectives/compiled.py"),
]


@pytest.mark.parametrize("cls,member,kwargs,user", OVERRIDDEN,
                         ids=[f"{c.__name__}.{m}" for c, m, _, _ in OVERRIDDEN])
def test_overridden_elbo_internals_are_still_called(cls, member, kwargs, user):
    where = f"pyro.infer.{cls.__name__}.{member}, which {user} overrides"
    assert callable(getattr(cls, member, None)), f"{where}, is gone"
    spy_class, calls = spy_on(cls, member)
    spy_class(max_plate_nesting=1, **kwargs).loss_and_grads(model, guide, X)
    assert calls, f"{where}, is no longer called by {cls.__name__}.loss_and_grads"
    if member == "_differentiable_loss_particle":
        assert all(len(result) == 2 for result in calls), \
            f"{where}, no longer returns (loss, surrogate_loss)"


def test_elbo_get_traces_yields_model_and_guide_traces():
    # pyrovae/objectives/compiled.py (CompiledTerms._step_terms) iterates over it itself
    where = ("pyro.infer.Trace_ELBO._get_traces, which pyrovae/objectives/compiled.py "
             "(CompiledTerms._step_terms) calls")
    assert callable(getattr(Trace_ELBO, "_get_traces", None)), f"{where}, is gone"
    pairs = list(Trace_ELBO(num_particles=2, max_plate_nesting=1)._get_traces(
        model, guide, (X,), {}))
    assert len(pairs) == 2, f"{where}, no longer yields one pair per particle"
    for model_trace, guide_trace in pairs:
        assert {"z", "x"} <= set(model_trace.nodes) and "z" in guide_trace.nodes, \
            f"{where}, no longer yields (model_trace, guide_trace)"


def test_torch_jit_trace_is_still_there():
    # deprecated since torch 2.14 (a FutureWarning); pyro.ops.jit.trace records with it,
    # and pyrovae/objectives/compiled.py also uses optimized_execution and TracerWarning
    for member in ("trace", "optimized_execution", "TracerWarning"):
        assert hasattr(torch.jit, member), (
            f"torch.jit.{member} is gone: the compiled step (pyrovae/objectives/compiled.py, "
            f"through pyro.ops.jit) cannot work; train with --no-jit or an older torch")


def test_a_tensor_version_counts_its_in_place_changes():
    # pyrovae/vae.py reads x._version so that the model does not check again the values
    # of a batch the guide checked, unless something changed it in place since
    x = torch.zeros(3)
    assert hasattr(x, "_version"), (
        "torch.Tensor._version is gone; pyrovae/vae.py (VAE._check_step_data) needs it")
    before = x._version
    x.add_(1.0)
    assert x._version > before, "torch.Tensor._version no longer counts in-place changes"


def test_pyro_says_whether_validation_is_enabled():
    # pyrovae/vae.py checks data values in model and guide only while it is
    from pyro.infer import util

    assert hasattr(util, "is_validation_enabled"), (
        "pyro.infer.util.is_validation_enabled is gone; pyrovae/vae.py needs it")
    with pyro.validation_enabled(False):
        assert not util.is_validation_enabled()
    with pyro.validation_enabled(True):
        assert util.is_validation_enabled()


def test_an_affine_autoregressive_step_inverts_through_its_inverse_attribute():
    # pyrovae/families/flows.py (IAFGuide.make_dist) wraps each step's _inverse, which the
    # stable step sets as an instance attribute, so that a float64 flow inverts in float64
    from pyro.distributions.transforms import ConditionalAffineAutoregressive
    from pyro.nn import ConditionalAutoRegressiveNN

    where = ("pyro.distributions.transforms.AffineAutoregressive._inverse, which "
             "pyrovae/families/flows.py (IAFGuide.make_dist) wraps")
    step = ConditionalAffineAutoregressive(ConditionalAutoRegressiveNN(3, 2, [6]), stable=True)
    transform = step.condition(torch.zeros(2))
    assert "_inverse" in vars(transform), f"{where}, is no longer set on the instance"
    calls = []
    inverse = transform._inverse
    transform._inverse = lambda y: calls.append(y) or inverse(y)
    transform.inv(torch.ones(3))
    assert len(calls) == 1, f"{where}, is no longer what Transform.inv calls"


def test_a_trace_keeps_a_log_prob_already_in_its_site():
    # pyrovae/evaluation/ais.py (_Path.terms) puts the log q(z|x) of a flow guide, read
    # from the flow's forward pass, into the site, so that compute_log_prob does not
    # invert the flow
    trace = pyro.poutine.trace(guide).get_trace(X)
    given = torch.full((3,), -7.0)
    trace.nodes["z"]["log_prob"] = given
    trace.compute_log_prob()
    assert trace.nodes["z"]["log_prob"] is given, (
        "pyro.poutine.Trace.compute_log_prob now scores a site that holds a log_prob; "
        "pyrovae/evaluation/ais.py (_Path.terms) relies on it keeping that one")
