"""Tests for fmtoy.symbolic: the SymPy derivations equal the paper's closed forms, satisfy the continuity equation
and the instantaneous change of variables, fail for wrong fields, and agree with the numeric fmtoy.paths."""

from __future__ import annotations

import pytest
import sympy as sp

from fmtoy import symbolic as S
from fmtoy.symbolic import t, x, x1, y

mu = sp.Function("mu", real=True)(t)
sigma = sp.Function("sigma", positive=True)(t)
dmu, dsigma = sp.diff(mu, t), sp.diff(sigma, t)
thm3 = dsigma / sigma * (x - mu) + dmu  # FM paper Thm 3


def test_gaussian_conditional_velocity_is_thm3_and_generates_the_flow():
    u = S.gaussian_conditional_velocity(mu, sigma)
    assert S.is_zero(u - thm3)
    x0 = sp.Symbol("x_0", real=True)
    psi = sigma * x0 + mu  # Eq. (13): d/dt psi_t(x_0) = u_t(psi_t(x_0))
    assert S.is_zero(sp.diff(psi, t) - u.subs(x, psi))
    assert not S.is_zero(sp.diff(psi, t) - (2 * u).subs(x, psi))


CASES = {
    "ot": S.ot_velocity,
    "ve-generic": lambda: S.ve_velocity("generic"),
    "ve-geometric": lambda: S.ve_velocity("geometric"),
    "vp-linear": lambda: S.vp_velocity("linear"),
    "vp-generic": lambda: S.vp_velocity("generic"),
}


@pytest.mark.parametrize("case", CASES)
def test_special_cases_match_paper(case):
    derived, paper = CASES[case]()
    assert sp.simplify(derived - paper) == 0
    assert S.is_zero(derived - paper, method="points")
    wrong = paper.subs(x1, 2 * x1)  # a field that ignores part of the mean: must be caught
    assert not S.is_zero(derived - wrong, method="points")


def test_ot_endpoints():
    derived, _ = S.ot_velocity()
    assert sp.simplify(derived.subs(t, 0) - (x1 - (1 - S.sigma_min) * x)) == 0  # u_0 = x_1 - (1 - sigma_min) x
    assert sp.simplify(derived.subs(S.sigma_min, 0) - (x1 - x) / (1 - t)) == 0  # rectified flow field


def test_continuity_1d_generic_gaussian_path():
    p = S.gaussian_density(x, mu, sigma)
    assert S.continuity_residual(p, thm3) == 0


@pytest.mark.parametrize("wrong", [dsigma / sigma * (x - mu), 2 * thm3, thm3 + 1, -thm3, dsigma / sigma * x + dmu])
def test_continuity_1d_wrong_fields_fail(wrong):
    p = S.gaussian_density(x, mu, sigma)
    assert S.continuity_residual(p, wrong) != 0


@pytest.mark.parametrize("name", ["ot", "ve", "vp"])
def test_continuity_fmtoy_paths_closed_forms(name):
    alpha, sig = S.path_schedule(name)
    u = {"ot": S.ot_velocity, "ve": lambda: S.ve_velocity("geometric"), "vp": S.vp_velocity}[name]()[1]
    p = S.gaussian_density(x, alpha * x1, sig)
    r = S.continuity_residual(p, u, simplify=False)
    assert S.is_zero(r, method="points", n=4)
    assert not S.is_zero(S.continuity_residual(p, u.subs(x1, 0), simplify=False), method="points")


def test_continuity_2d_affine_flow():
    m1, m2 = sp.Function("m_1", real=True)(t), sp.Function("m_2", real=True)(t)
    p = S.gaussian_density(x, m1, sigma) * S.gaussian_density(y, m2, sigma)
    u = [dsigma / sigma * (x - m1) + sp.diff(m1, t), dsigma / sigma * (y - m2) + sp.diff(m2, t)]
    assert S.continuity_residual(p, u, xs=[x, y]) == 0
    # a rotation about the mean leaves an isotropic Gaussian unchanged: the generating field is not unique
    omega = sp.Function("omega", real=True)(t)
    rotated = [u[0] - omega * (y - m2), u[1] + omega * (x - m1)]
    assert S.continuity_residual(p, rotated, xs=[x, y]) == 0
    assert S.continuity_residual(p, [u[0], 2 * u[1]], xs=[x, y]) != 0
    assert S.continuity_residual(p, [u[0], u[1] - sp.diff(m2, t)], xs=[x, y]) != 0


def test_instantaneous_change_of_variables_linear_field():
    lhs, rhs = S.linear_flow_log_density()  # generic a(t), b(t)
    assert sp.simplify(lhs - rhs) == 0 and rhs == -sp.Function("a", real=True)(t)
    lhs, rhs = S.linear_flow_log_density(t**2 - 1, sp.exp(t))
    assert sp.simplify(lhs - rhs) == 0 and rhs == 1 - t**2


def test_log_density_rate_is_minus_divergence_along_gaussian_path():
    p = S.gaussian_density(x, mu, sigma)
    assert S.is_zero(S.log_density_rate(p, thm3) + sp.diff(thm3, x))
    wrong = dsigma / sigma * (x - mu)
    assert not S.is_zero(S.log_density_rate(p, wrong) + sp.diff(wrong, x))


def test_two_point_marginal_satisfies_continuity():
    p, u = S.two_component_marginal_1d()
    assert S.continuity_residual(p, u) == 0
    m1, m2 = sp.symbols("m_1 m_2", real=True)
    w = sp.Symbol("w", positive=True)
    a, sg = sp.Function("alpha", real=True)(t), sp.Function("sigma", positive=True)(t)
    p1, p2 = S.gaussian_density(x, a * m1, sg), S.gaussian_density(x, a * m2, sg)
    u1, u2 = (S.gaussian_conditional_velocity(a * m, sg) for m in (m1, m2))
    unweighted = (p1 * u1 + p2 * u2) / p  # forgets the weights w_k: a wrong field
    assert not S.is_zero(S.continuity_residual(p, unweighted, simplify=False), method="points")
    average = w * u1 + (1 - w) * u2  # prior average instead of posterior average: also wrong
    assert not S.is_zero(S.continuity_residual(p, average, simplify=False), method="points")


@pytest.mark.parametrize("tau", [0, sp.Rational(1, 2), sp.Symbol("tau", positive=True)])
@pytest.mark.parametrize("name", ["generic", "ot", "vp"])
def test_two_gaussian_marginal_satisfies_continuity(name, tau):
    kw = {} if name == "generic" else dict(zip(("alpha", "sigma"), S.path_schedule(name)))
    p, u = S.two_component_marginal_1d(
        x1s=(-1, sp.Rational(5, 2)), weights=(sp.Rational(1, 3), sp.Rational(2, 3)), target_std=tau, **kw
    )
    assert S.is_zero(S.continuity_residual(p, u, simplify=False), method="points")
    assert not S.is_zero(S.continuity_residual(p, 1.5 * u, simplify=False), method="points")


def test_is_zero_points_is_exact():
    a, b = sp.symbols("a b")
    assert S.is_zero(sp.exp(a) * sp.exp(b) - sp.exp(a + b), method="points")
    assert S.is_zero(sp.sqrt(a**2 + b**2) ** 2 - a**2 - b**2, method="points")
    assert not S.is_zero(a * b - b * a + sp.Rational(1, 10**30), method="points")  # relative, not absolute
    assert S.is_zero(sp.log(a / b) - sp.log(a) + sp.log(b), method="points")  # not exact-expandable: 60 digits
    assert not S.is_zero(sp.diff(mu, t) - mu, method="points")  # derivative and value are independent


@pytest.mark.parametrize(
    "call, err",
    [
        (lambda: S.gaussian_conditional_velocity(x * t, sigma), ValueError),
        (lambda: S.gaussian_conditional_velocity(mu, 0), ValueError),
        (lambda: S.gaussian_conditional_velocity(mu, sigma, t="t"), TypeError),
        (lambda: S.gaussian_conditional_velocity("t", sigma), TypeError),
        (lambda: S.gaussian_conditional_velocity([mu], sigma), TypeError),
        (lambda: S.path_schedule("rectified"), ValueError),
        (lambda: S.ve_velocity("linear"), ValueError),
        (lambda: S.vp_velocity("cosine"), ValueError),
        (lambda: S.continuity_residual(S.gaussian_density(x, mu, sigma), [thm3, thm3], xs=[x]), ValueError),
        (lambda: S.continuity_residual(S.gaussian_density(x, mu, sigma), thm3, xs=x), TypeError),
        (lambda: S.continuity_residual(S.gaussian_density(x, mu, sigma), [thm3, thm3], xs=[x, x]), ValueError),
        (lambda: S.continuity_residual(S.gaussian_density(x, mu, sigma), thm3, xs=[t]), ValueError),
        (lambda: S.linear_flow_log_density(a=x * t), ValueError),
        (lambda: S.two_component_marginal_1d(weights=(sp.Rational(1, 2), sp.Rational(1, 3))), ValueError),
        (lambda: S.two_component_marginal_1d(weights=(2, -1)), ValueError),
        (lambda: S.two_component_marginal_1d(x1s=(0, 1, 2)), ValueError),
        (lambda: S.two_component_marginal_1d(target_std=-1), ValueError),
        (lambda: S.is_zero(x, method="numeric"), ValueError),
        (lambda: S.values_at_random_points(x, n=0), ValueError),
    ],
)
def test_bad_inputs(call, err):
    with pytest.raises(err):
        call()


# --- one source of truth: the closed forms against the numeric fmtoy.paths -------------------------------------


def test_cross_check_paths_agree():
    pytest.importorskip("fmtoy.paths")
    errors = S.cross_check_paths(n=64, seed=0)
    assert {k.split(":")[1].split("/")[0] for k in errors} == {"ot", "ve", "vp"}
    assert max(errors.values()) < 1e-9, errors


def test_cross_check_paths_catches_drift():
    paths = pytest.importorskip("fmtoy.paths")

    class Drifted(paths.VPPath):
        def conditional_velocity(self, x, t, x1):
            return super().conditional_velocity(x, t, x1) * 1.01

    errors = S.cross_check_paths([paths.VPPath(beta_min=0.5, beta_max=10.0), Drifted()], n=16, seed=1)
    assert max(v for k, v in errors.items() if k.startswith("0:")) < 1e-9
    assert errors["1:vp/conditional_velocity"] > 1e-4 and errors["1:vp/alpha"] < 1e-9


# --- chapter 8: the velocity-score conversion, guidance and the tilt (fmtoy.symbolic.guidance) ------------------


def _guidance_module():
    from fmtoy.symbolic import guidance

    return guidance


def test_condot_score_coefficients():
    SG = _guidance_module()
    a, b = SG.path_score_coefficients("ot")
    assert sp.simplify(a - 1 / t) == 0
    assert sp.simplify(b - (1 - (1 - S.sigma_min) * t) / t) == 0
    assert sp.simplify(b - (1 - t) / t) != 0  # sigma_min enters b: the comparison is not vacuous


@pytest.mark.parametrize("name", ["ot", "vp", "ve"])
def test_score_coefficients_match_the_numeric_ones(name):
    torch = pytest.importorskip("torch")
    from fmtoy.methods.guidance import score_coefficients
    from fmtoy.paths import CondOTPath, VEPath, VPPath

    SG = _guidance_module()
    paths = {
        "ot": [CondOTPath(), CondOTPath(sigma_min=0.1)],
        "vp": [VPPath(), VPPath(beta_min=0.5, beta_max=10.0)],
        "ve": [VEPath(), VEPath(sigma_min=0.05, sigma_max=4.0)],
    }[name]
    a_sym, b_sym = SG.path_score_coefficients(name)
    for path in paths:
        values = {p: getattr(path, p.name) for p in S.PATH_PARAMS[name]}
        a_f, b_f = (sp.lambdify(t, e.subs(values), "math") for e in (a_sym, b_sym))
        for tv in (0.1, 0.37, 0.8, 0.95):
            a, b = score_coefficients(path, tv)
            assert float(a) == pytest.approx(a_f(tv), rel=1e-10, abs=1e-12), (path, tv)
            assert float(b) == pytest.approx(b_f(tv), rel=1e-10, abs=1e-12), (path, tv)
        ts = torch.tensor([0.2, 0.6], dtype=torch.float64)
        a, b = score_coefficients(path, ts)
        assert [float(v) for v in b[:, 0]] == pytest.approx([b_f(0.2), b_f(0.6)], rel=1e-10)


@pytest.mark.parametrize("name", ["ot", "vp", "ve"])
def test_conversion_and_guidance_identities(name):
    SG = _guidance_module()
    conv = SG.all_zero(SG.conversion_residuals(name))
    assert set(conv) == {"u_t(x)", "u_t(x | 0)", "u_t(x | 1)"} and all(conv.values()), conv
    for c in (0, 1):
        guid = SG.all_zero(SG.guidance_residuals(name, c))
        assert len(guid) == 2 and all(guid.values()), (c, guid)


@pytest.mark.parametrize("name", ["ot", "vp"])
def test_wrong_guidance_fields_are_caught(name):
    SG = _guidance_module()
    m = SG.two_class_mixture(name)
    a, b = SG.score_coefficients(m.alpha, m.sigma)
    cfg = (1 - SG.w) * m.u + SG.w * m.u_c[0]
    log_cls = sp.log(SG.pi0 * m.p_c[0] / m.p)
    doubled = m.u + SG.w * 2 * b * sp.diff(log_cls, x)  # the classifier term with b doubled
    right = m.u + SG.w * b * sp.diff(log_cls, x)
    assert SG.all_zero({"right": right - cfg, "doubled": doubled - cfg}) == {"right": True, "doubled": False}
    wrong_a = m.u - ((a + 1) * x + b * sp.diff(sp.log(m.p), x))  # the conversion with a_t off by one
    assert SG.all_zero({"a + 1": wrong_a}) == {"a + 1": False}
    assert not S.is_zero(m.u_c[1] - (a * x + b * sp.diff(sp.log(m.p_c[0]), x)), method="points")  # wrong class


def test_tilt_is_not_the_path_of_the_tilted_target():
    SG = _guidance_module()
    tilt, path_of_tilt = SG.tilt_vs_path()
    diff = tilt - path_of_tilt
    assert sp.simplify(diff.subs(t, 0)) == 0 and sp.simplify(diff.subs(t, 1)) == 0
    v, big_v = sp.symbols("v V", positive=True)
    mid = sp.simplify(diff.subs({t: sp.Rational(1, 2), SG.w: 2}))
    assert mid != 0
    assert sp.simplify(mid.subs(big_v, v)) == 0  # equal variances: the tilt is trivial, no gap
    assert abs(float(mid.subs({v: sp.Rational(1, 4), big_v: 4}))) > 0.1
    for w_ in (0, 1):  # w = 0 and w = 1 are the unguided paths themselves
        assert sp.simplify(diff.subs(SG.w, w_)) == 0


def _discrete_module():
    from fmtoy.symbolic import discrete

    return discrete


def test_discrete_check_discrete_all_true():
    SD = _discrete_module()
    ok = SD.check_discrete()
    assert len(ok) == 16 and all(ok.values()), {k: v for k, v in ok.items() if not v}
    assert set(SD.__all__) <= set(dir(SD))


@pytest.mark.parametrize("source", ["uniform", "mask"])
def test_discrete_wrong_rates_break_kolmogorov(source):
    SD = _discrete_module()
    path = SD.mixture_path(3, source)
    assert path.p.shape == (3, 3 if source == "uniform" else 2) and len(path.rates) == path.p.cols
    assert SD.kolmogorov_residuals(path).is_zero_matrix
    wrong = SD.wrong_rates(path)
    res = SD.kolmogorov_residuals(path, wrong)
    assert not res.is_zero_matrix
    assert all(SD.rate_checks(path, wrong).values())  # still a rate matrix, only too slow by the factor 1 - kappa
    # so its residual is kappa kappa' (delta(y, c) - p_0(y)), zero at t = 0 only
    expected = sp.Matrix(path.p.rows, path.p.cols, lambda a, c: SD.kappa * SD.dkappa * (int(a == c) - path.p0[a]))
    assert (res - expected).applyfunc(sp.simplify).is_zero_matrix


def test_discrete_rate_checks_catch_non_rate_matrices():
    SD = _discrete_module()
    path = SD.mixture_path(3, "generic")
    negated = [-r for r in path.rates]
    assert SD.rate_checks(path, negated) == {"rows sum to 0": True, "off-diagonal >= 0": False}
    no_diagonal = [r - sp.diag(*r.diagonal()) for r in path.rates]
    assert SD.rate_checks(path, no_diagonal) == {"rows sum to 0": False, "off-diagonal >= 0": True}
    assert not SD.kolmogorov_residuals(path, no_diagonal).is_zero_matrix


@pytest.mark.parametrize("source", ["uniform", "mask"])
def test_discrete_data_marginal_rates_break_the_marginal_path(source):
    SD = _discrete_module()
    right = SD.marginal_kolmogorov_residual(2, source)
    assert right.residual.shape == (right.p.rows, right.p.rows) == ((2, 2) if source == "uniform" else (3, 3))
    assert SD.residual_is_zero(right.residual)
    slip = SD.marginal_kolmogorov_residual(2, source, rates="data marginal")
    assert not SD.residual_is_zero(slip.residual)
    assert SD.residual_is_zero(slip.generator * sp.ones(slip.generator.cols, 1))  # still a generator
    # the slip is right for a product target q(c, d) = q_1(c) q_2(d): the posteriors then factor too
    r, s_ = sp.symbols("r s", positive=True)
    product = dict(zip(list(slip.q)[:3], [r * s_, r * (1 - s_), (1 - r) * s_]))
    assert SD.residual_is_zero(slip.residual.subs(product))


def test_discrete_uniform_path_with_kappa_t():
    SD = _discrete_module()
    for tokens in (2, 4):
        p = SD.mixture_path(tokens, "uniform").p.subs(SD.kappa, t)
        want = sp.Matrix(tokens, tokens, lambda a, c, n=tokens: (1 - t) / n + t * int(a == c))
        assert (p - want).applyfunc(sp.simplify).is_zero_matrix, tokens
        assert all(sp.simplify(sum(p[:, c]) - 1) == 0 for c in range(tokens))
    mask = SD.mixture_path(3, "mask").p.subs(SD.kappa, t)
    assert mask == sp.Matrix([[t, 0], [0, t], [1 - t, 1 - t]])


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda SD: SD.mixture_path(1), ValueError, "tokens"),
        (lambda SD: SD.mixture_path(1.5), ValueError, "tokens"),
        (lambda SD: SD.mixture_path(True), ValueError, "tokens"),
        (lambda SD: SD.mixture_path(3, source="foo"), ValueError, "source"),
        (lambda SD: SD.marginal_kolmogorov_residual(1), ValueError, "values"),
        (lambda SD: SD.marginal_kolmogorov_residual(2, rates="prior"), ValueError, "rates"),
        (lambda SD: SD.kolmogorov_residuals("path"), TypeError, "path"),
        (lambda SD: SD.kolmogorov_residuals(SD.mixture_path(3), [sp.eye(3)]), ValueError, "rates"),
    ],
)
def test_discrete_bad_inputs(call, error, name):
    SD = _discrete_module()
    with pytest.raises(error, match=name) as info:
        call(SD)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------- flow maps (ch. 10)
is_zero = S.is_zero


def _flowmap_modules():
    from fmtoy.symbolic import flowmap, shortcut

    return flowmap, shortcut


def test_flow_map_properties_of_the_gaussian_flow():
    F, Z = _flowmap_modules()
    g = Z.gaussian_marginal_flow()
    assert sp.simplify(F.semigroup_residual(g)) == 0
    assert sp.simplify(F.backward_residual(g)) == 0
    f = F.consistency_function(g)
    assert sp.simplify(F.consistency_residual(f, g)) == 0 and sp.simplify(f(Z.x, 1) - Z.x) == 0
    st = F.s_time
    mean, variance = F.gaussian_pushforward(g, st * Z.m, sp.sqrt((1 - st) ** 2 + st**2 * Z.s_data**2))
    assert sp.simplify(mean - Z.t * Z.m) == 0
    assert sp.simplify(variance - ((1 - Z.t) ** 2 + Z.t**2 * Z.s_data**2)) == 0


def test_flow_map_checks_fail_for_wrong_maps():
    F, Z = _flowmap_modules()
    g = Z.gaussian_marginal_flow()
    euler = Z.KnownFlow(g.u, lambda xx, tt, rr: xx + (rr - tt) * g.u.subs({Z.x: xx, Z.t: tt}, simultaneous=True))
    assert not is_zero(F.semigroup_residual(euler), method="points")  # one Euler step is not a flow map
    assert not is_zero(F.backward_residual(euler), method="points")
    f_wrong = lambda xx, tt: g.phi(xx, tt, sp.Rational(9, 10))  # noqa: E731  (ends at t = 0.9, not 1)
    assert sp.simplify(F.consistency_residual(f_wrong, g)) == 0 and sp.simplify(f_wrong(Z.x, 1) - Z.x) != 0
    with pytest.raises(ValueError, match="affine"):
        F.gaussian_pushforward(Z.KnownFlow(Z.x**2, lambda xx, tt, rr: xx**3), 0, 1)


def test_gaussian_reflow_costs_and_straight_paths():
    F, Z = _flowmap_modules()
    g = Z.gaussian_marginal_flow()
    R = F.gaussian_reflow(g)
    assert sp.expand(R.rectified_map - (Z.m + Z.s_data * Z.x)) == 0
    assert sp.factor(R.cost_independent - R.cost_rectified) == 2 * Z.s_data  # > 0: the cost falls by 2s
    assert sp.simplify(Z.flow_residual(R.rectified_flow)) == 0  # the rectified field generates the straight lines
    assert sp.simplify(F.acceleration(R.rectified_flow)) == 0
    assert not is_zero(F.acceleration(g), method="points")  # the marginal flow itself curves (s != 1)
    assert sp.simplify(R.rectified_flow.phi(Z.x, 0, 1) - R.rectified_map) == 0  # a second reflow: the same coupling


def test_distillation_fixed_point_is_the_solvers_composition():
    F, Z = _flowmap_modules()
    n = 4
    lin, g = Z.linear_flow(), Z.gaussian_marginal_flow()
    for flow in (lin, g):
        exact = F.distillation_fixed_point(
            lambda xx, k, flow=flow: flow.phi(xx, sp.Rational(k, n), sp.Rational(k + 1, n)), n
        )
        assert all(is_zero(exact[k] - flow.phi(Z.x, sp.Rational(k, n), 1), method="points") for k in range(n + 1))
    euler = F.distillation_fixed_point(lambda xx, k: xx + Z.lam * xx / n, n)
    assert sp.expand(euler[0] - (1 + Z.lam / n) ** n * Z.x) == 0  # n Euler steps, not exp(lambda) x
    assert not is_zero(euler[0] - lin.phi(Z.x, 0, 1), method="points")


def test_training_bias_is_second_order_with_the_conditional_variance():
    F, _ = _flowmap_modules()
    bias = F.training_bias()
    assert sp.simplify(bias.difference - bias.second_order) == 0
    assert bias.difference.has(F.var) and sp.diff(bias.difference, F.delta).subs(F.delta, 0) == 0
    with pytest.raises(ValueError, match="at most 3"):
        F.training_bias(order=4)
