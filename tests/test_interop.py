"""from_torch / to_torch: round trips, and gradients that agree with PyTorch autograd."""

import numpy as np
import pytest

import fastgrad

torch = pytest.importorskip("torch")
nn = torch.nn


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", fastgrad.ACTIVATIONS)
def test_to_torch_then_from_torch_gives_back_the_same_net_and_theta(activation, dtype):
    net = fastgrad.MLP([3, 6, 5, 2], activation=activation, loss="mse")
    theta = net.init(seed=1, dtype=dtype)
    theta[net.layers[0].b_start : net.layers[0].end] = np.arange(6) / 7  # non-zero biases travel too
    module = fastgrad.to_torch(net, theta)
    assert next(module.parameters()).dtype == getattr(torch, np.dtype(dtype).name)
    back_net, back_theta = fastgrad.from_torch(module, loss="mse")
    assert back_net == net
    assert back_theta.dtype == dtype
    np.testing.assert_array_equal(back_theta, theta)


def _flat_torch_grad(module) -> np.ndarray:
    parts = []
    for m in module:
        if isinstance(m, nn.Linear):
            parts += [m.weight.grad.numpy().ravel(), m.bias.grad.numpy().ravel()]
    return np.concatenate(parts)


@pytest.mark.parametrize(
    ("activation", "loss"), [("gelu", "cross_entropy"), ("softplus", "mse"), ("leaky_relu", "cross_entropy")]
)
def test_fastgrad_gradient_of_a_torch_module_matches_autograd(activation, loss):
    rng = np.random.default_rng(0)
    act = {"gelu": nn.GELU(approximate="tanh"), "softplus": nn.Softplus(), "leaky_relu": nn.LeakyReLU()}
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Linear(4, 7), act[activation], nn.Linear(7, 5), act[activation], nn.Linear(5, 3)
    )
    module = module.double()
    net, theta = fastgrad.from_torch(module, loss=loss)
    X = rng.standard_normal((16, 4))
    if loss == "cross_entropy":
        y = rng.integers(0, 3, size=16)
        t_loss = nn.functional.cross_entropy(module(torch.from_numpy(X)), torch.from_numpy(y))
    else:
        y = rng.standard_normal((16, 3))
        z = module(torch.from_numpy(X))
        t_loss = 0.5 * ((z - torch.from_numpy(y)) ** 2).sum(dim=1).mean()
    t_loss.backward()
    res = fastgrad.backprop(net, theta, X, y, compute=("loss", "grad"), backend="numpy")
    assert res.loss == pytest.approx(t_loss.item(), rel=1e-12)
    np.testing.assert_allclose(res.grad, _flat_torch_grad(module), rtol=1e-10, atol=1e-13)


def test_from_torch_reads_linear_layers_without_activation_as_identity():
    module = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    net, theta = fastgrad.from_torch(module)
    assert net.activation == "identity" and net.sizes == (3, 4, 2)
    (W1, b1), (_W2, b2) = net.unpack(theta)
    np.testing.assert_array_equal(W1, module[0].weight.detach().numpy())
    np.testing.assert_array_equal(b1, module[0].bias.detach().numpy())
    np.testing.assert_array_equal(b2, module[1].bias.detach().numpy())


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (nn.Linear(3, 2), "expected a torch.nn.Sequential"),
        (nn.Sequential(nn.Linear(3, 4), nn.Dropout(), nn.Linear(4, 2)), "layer 1 is Dropout"),
        (nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2)), "layer 0 is Linear(3, 4, bias=False)"),
        (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2, bias=False)), "layer 2 is Linear(4, 2, b"),
        (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)), "layer 1 is LayerNorm, a"),
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), "layer 1 is BatchNorm1d"),
        (nn.Sequential(nn.Conv1d(1, 1, 1), nn.Linear(3, 2)), "layer 0 is Conv1d; fastgrad computes dense"),
        (nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Linear(4, 2)), "layer 0 is a nested"),
        (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.1), nn.Linear(4, 2)), "layer 2 is Dropout"),
        (nn.Sequential(nn.Linear(3, 4), nn.Softsign(), nn.Linear(4, 2)), "1: unsupported layer Softsign"),
        (nn.Sequential(), "holds no torch.nn.Linear"),
        (nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)), "approximate='tanh'"),
        (nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.2), nn.Linear(4, 2)), "negative_slope=0.01"),
        (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Softmax(dim=1)), "last layer must be"),
        (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "mixes"),
        (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.ReLU(), nn.Linear(4, 2)), "at most one activation"),
        (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(5, 2)), "takes 5 inputs"),
        (nn.Sequential(nn.Flatten(), nn.Linear(3, 2)), "layer 0: unsupported layer Flatten"),
        (nn.Sequential(nn.Tanh(), nn.Linear(3, 2)), "first layer must be Linear"),
        (nn.Sequential(nn.Linear(3, 4).half(), nn.Tanh(), nn.Linear(4, 2).half()), "float32 or all float64"),
    ],
)
def test_from_torch_rejects_what_fastgrad_cannot_compute_with_a_clear_error(module, message):
    with pytest.raises(
        (TypeError, ValueError), match="module: .*" + message.replace("(", r"\(").replace(")", r"\)")
    ):
        fastgrad.from_torch(module)


def test_from_torch_rejects_parameters_shared_between_layers():
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="module: two Linear layers share a parameter"):
        fastgrad.from_torch(nn.Sequential(lin, nn.Tanh(), lin))
    other = nn.Linear(4, 4)
    other.weight = lin.weight  # tied weights, distinct modules
    with pytest.raises(ValueError, match="share a parameter"):
        fastgrad.from_torch(nn.Sequential(lin, nn.Tanh(), other))


def test_the_error_for_an_unsupported_module_names_it_before_the_layer_count_is_checked():
    # a Dropout beside an activation used to be reported as "2 modules between two Linear layers"
    module = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"module: layer 2 is Dropout") as info:
        fastgrad.from_torch(module)
    assert "2 modules" not in str(info.value)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_theta_X_and_y_may_be_torch_tensors_and_give_the_numpy_results(dtype, requires_grad):
    net = fastgrad.MLP([5, 6, 3], activation="tanh", loss="cross_entropy")
    theta = net.init(seed=2, dtype=dtype)
    rng = np.random.default_rng(2)
    X = rng.standard_normal((9, 5)).astype(dtype)
    y = rng.integers(0, 3, size=9)
    expect = fastgrad.backprop(net, theta, X, y, compute=("loss", "grad", "norms"))
    t_theta = torch.from_numpy(theta.copy()).requires_grad_(requires_grad)
    t_X = torch.from_numpy(X).requires_grad_(requires_grad)
    got = fastgrad.backprop(net, t_theta, t_X, torch.from_numpy(y), compute=("loss", "grad", "norms"))
    assert got.loss == expect.loss
    np.testing.assert_array_equal(got.grad, expect.grad)
    np.testing.assert_array_equal(got.norms, expect.norms)
    clipped = fastgrad.clipped_grad(net, t_theta, t_X, torch.from_numpy(y), max_norm=0.5)
    np.testing.assert_array_equal(clipped, fastgrad.clipped_grad(net, theta, X, y, max_norm=0.5))
    module = fastgrad.to_torch(net, t_theta)
    np.testing.assert_array_equal(fastgrad.from_torch(module)[1], theta)


def test_a_torch_theta_numpy_cannot_hold_is_refused_naming_theta():
    net = fastgrad.MLP([2, 3, 2])
    with pytest.raises(TypeError, match="theta: this torch tensor cannot be read"):
        fastgrad.backprop(net, torch.zeros(net.num_params, dtype=torch.bfloat16), np.zeros((1, 2)), [0])
    with pytest.raises(TypeError, match="theta: expected dtype float32 or float64"):
        fastgrad.backprop(net, torch.zeros(net.num_params, dtype=torch.float16), np.zeros((1, 2)), [0])


def test_to_torch_rejects_a_theta_of_the_wrong_shape_naming_theta():
    net = fastgrad.MLP([3, 4, 2])
    with pytest.raises(ValueError, match="theta"):
        fastgrad.to_torch(net, np.zeros(5, dtype=np.float32))
    with pytest.raises(TypeError, match="theta"):
        fastgrad.to_torch(net, [0.0] * net.num_params)


def test_from_torch_rejects_a_softplus_threshold_where_torch_is_not_log_1_plus_exp():
    # PyTorch's softplus is z itself above its threshold; at threshold 1 the gradient was 5-28 % off
    module = nn.Sequential(nn.Linear(3, 4), nn.Softplus(threshold=1.0), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"module: layer 1: Softplus\(threshold=1.0\) is not supported"):
        fastgrad.from_torch(module)
    for threshold in (20.0, 40.0, 100.0):  # the default (~e^-20 apart) and those that agree to rounding
        module = nn.Sequential(nn.Linear(3, 4), nn.Softplus(threshold=threshold), nn.Linear(4, 2))
        assert fastgrad.from_torch(module)[0].activation == "softplus"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_to_torch_softplus_agrees_with_fastgrad_above_torchs_default_threshold(dtype):
    # nn.Softplus() returns z for z > 20 where log(1 + e^z) = z + e^-z: ~2e-9 apart, seen in float64
    net = fastgrad.MLP([1, 1, 1], activation="softplus", loss="linear")
    theta = np.array([1.0, 0.0, 1.0, 0.0], dtype=dtype)  # W1 = 1, b1 = 0, W2 = 1, b2 = 0: z_out = softplus(x)
    X = np.array([[-30.0], [0.5], [21.0], [25.0], [38.0], [45.0], [300.0]], dtype=dtype)
    module = fastgrad.to_torch(net, theta)
    with torch.no_grad():
        torch_out = module(torch.from_numpy(X)).numpy()[:, 0]
    eps = float(np.finfo(dtype).eps)
    ours = -fastgrad.backprop(net, theta, X, np.zeros(len(X), dtype), ("loss",)).loss * len(X)
    ref = np.logaddexp(0, X[:, 0].astype(np.float64))  # log(1 + e^x), exactly rounded
    np.testing.assert_allclose(torch_out, ref, rtol=4 * eps, atol=0)
    assert ours == pytest.approx(ref.sum(), rel=10 * eps)
