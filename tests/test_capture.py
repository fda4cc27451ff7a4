import pytest
import torch
from models import MODEL_FACTORIES, inputs_for

from diffopt import CaptureError, capture, optimize
from diffopt.ir.signature import first_tensor_output


def _eager(model, inputs):
    with torch.no_grad():
        return first_tensor_output(model(**inputs))


def _canonical(captured, inputs):
    return [inputs[name] for name in captured.signature.input_names]


@pytest.mark.parametrize("kind", sorted(MODEL_FACTORIES))
def test_identity_program_reproduces_model_on_fresh_inputs(kind):
    model = MODEL_FACTORIES[kind]()
    captured = capture(model, inputs_for(kind, batch=2, seed=0))
    optimized = optimize(captured, passes=[])
    for batch, seed in [(1, 11), (3, 12), (5, 13)]:  # batch sizes other than the capture batch
        inputs = inputs_for(kind, batch, seed)
        expected = _eager(model, inputs)
        got = optimized(*_canonical(captured, inputs))
        assert got.shape == expected.shape
        assert float((got - expected).norm() / expected.norm()) <= 1e-6


def test_signature_names_latent_timestep_and_conditions():
    captured = capture(MODEL_FACTORIES["diffusers_pixart"](), inputs_for("diffusers_pixart", 2, 0))
    assert captured.signature.latent == "hidden_states"
    assert captured.signature.timestep == "timestep"
    assert captured.signature.conditions == ("encoder_hidden_states",)
    names = [n.name for n in captured.module.graph.nodes if n.op == "placeholder"]
    assert names == ["hidden_states", "timestep", "encoder_hidden_states"]


def test_positional_inputs_and_dict_outputs_are_normalised():
    class DictOutput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, sample, timestep):
            return {"sample": self.proj(sample) * timestep[:, None]}

    model = DictOutput().eval()
    captured = capture(model, (torch.randn(2, 4), torch.ones(2)))
    x, t = torch.randn(3, 4), torch.rand(3)
    assert torch.equal(captured.module(x, t)[0], model(x, t)["sample"])


def test_scalar_timestep_is_broadcast_to_the_batch():
    model = MODEL_FACTORIES["simple_dit"]()
    captured = capture(model, (torch.randn(2, 1, 16, 16), torch.tensor(7), torch.tensor([1, 2])))
    optimized = optimize(captured)
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 4])
    torch.testing.assert_close(optimized(x, 7, y), model(x, torch.tensor([7, 7]), y), rtol=0, atol=0)


def test_uncapturable_model_gets_one_clear_error():
    class DataDependent(torch.nn.Module):
        def forward(self, x, t):
            if x.sum() > 0:  # Python branch on a tensor value: not traceable
                return x * 2
            return x

    with pytest.raises(CaptureError) as info:
        capture(DataDependent(), (torch.randn(2, 3), torch.ones(2)))
    message = str(info.value)
    assert "DataDependent" in message
    assert "test_capture.py" in message  # where capture failed: the model's own line
    assert "What you can do" in message


def test_unknown_input_roles_are_reported():
    class Unnamed(torch.nn.Module):
        def forward(self, a, b):
            return a * b[:, None]

    with pytest.raises(CaptureError, match="which input is the latent"):
        capture(Unnamed(), (torch.randn(2), torch.randn(2)))
    captured = capture(Unnamed(), (torch.randn(2, 3), torch.randn(2)), latent="a", timestep="b")
    assert captured.signature.input_names == ("a", "b")


def test_optimize_requires_example_inputs_for_a_module():
    with pytest.raises(ValueError, match="example_inputs"):
        optimize(MODEL_FACTORIES["simple_dit"]())
