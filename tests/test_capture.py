import sys

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


@pytest.mark.parametrize("kind", ["simple_dit", "diffusers_dit"])
def test_batch_one_example_inputs_capture_a_graph_for_every_batch(kind):
    model = MODEL_FACTORIES[kind]()
    captured = capture(model, inputs_for(kind, batch=1, seed=0))
    for batch in (1, 4):
        inputs = inputs_for(kind, batch, seed=batch)
        expected = _eager(model, inputs)
        with torch.no_grad():
            got = captured.module(*_canonical(captured, inputs))[0]
        assert float((got - expected).norm() / expected.norm()) < 1e-6


def test_varargs_and_keyword_only_forwards():
    inner = MODEL_FACTORIES["diffusers_dit"]()

    class Varargs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x, t, *conditions):
            return self.inner(x, t, *conditions, return_dict=False)[0]

    class KeywordOnly(Varargs):
        def forward(self, x, *, t, labels):
            return self.inner(x, t, labels, return_dict=False)[0]

    example = inputs_for("diffusers_dit", 2, seed=0)
    fresh = inputs_for("diffusers_dit", 3, seed=1)
    x, t, labels = fresh["hidden_states"], fresh["timestep"], fresh["class_labels"]
    varargs = capture(Varargs(), (example["hidden_states"], example["timestep"], example["class_labels"]))
    assert varargs.signature.conditions == ("conditions[0]",)
    keyword_only = capture(
        KeywordOnly(), {"x": example["hidden_states"], "t": example["timestep"], "labels": labels[:2]}
    )
    expected = _eager(inner, fresh)
    for captured in (varargs, keyword_only):
        torch.testing.assert_close(optimize(captured)(x, t, labels), expected, rtol=1e-5, atol=1e-6)


def _pixart_inputs(batch, seed, resolution):
    inputs = inputs_for("diffusers_pixart", batch, seed)
    inputs["added_cond_kwargs"] = {
        "resolution": torch.tensor([resolution] * batch),
        "aspect_ratio": torch.tensor([[resolution[0] / resolution[1]]] * batch),
    }
    return inputs


def _flat(inputs):
    conditions = inputs["added_cond_kwargs"]
    return inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"], *conditions.values()


@pytest.mark.parametrize("dynamic_batch", [True, False])
def test_tensors_in_dict_arguments_are_graph_inputs_whose_values_count(dynamic_batch):
    """PixArt's added_cond_kwargs: its tensors are inputs (not constants), at any value."""
    from models import diffusers_pixart

    model = diffusers_pixart(seed=0, additional_conditions=True)
    captured = capture(model, _pixart_inputs(2, 0, (8.0, 8.0)), dynamic_batch=dynamic_batch)
    assert captured.signature.conditions == (
        "encoder_hidden_states",
        "added_cond_kwargs.resolution",
        "added_cond_kwargs.aspect_ratio",
    )
    optimized = optimize(captured)
    outputs = []
    for resolution in ((8.0, 8.0), (16.0, 12.0)):  # the dict tensors' values change between calls
        inputs = _pixart_inputs(2 if not dynamic_batch else 3, 5, resolution)
        outputs.append(optimized(*_flat(inputs)))
        torch.testing.assert_close(outputs[-1], _eager(model, inputs), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs[0], outputs[1])


def test_a_tuple_of_tensors_is_inputs_and_deeper_nesting_is_refused_by_name():
    class Listed(torch.nn.Module):
        def forward(self, x, t, extras):
            return x * extras[0] + extras[1]

    captured = capture(Listed(), (torch.randn(2, 3), torch.ones(2), (torch.ones(2, 3), torch.zeros(2, 3))))
    assert captured.signature.conditions == ("extras[0]", "extras[1]")
    x, scale, shift = torch.randn(3, 3), torch.randn(3, 3), torch.randn(3, 3)  # another batch, other values
    torch.testing.assert_close(optimize(captured)(x, torch.ones(3), scale, shift), x * scale + shift)
    with pytest.raises(CaptureError, match="input 'extras' holds tensors nested more than one level deep"):
        capture(Listed(), (torch.randn(2, 3), torch.ones(2), [[torch.ones(2, 3)], torch.ones(2, 3)]))


def test_a_graph_that_ignores_an_input_is_named_at_capture(monkeypatch):
    """The live-input check itself: a graph with the example's class labels baked in (right at
    the example, wrong at any other labels) is refused, naming the input."""
    capture_module = sys.modules["diffopt.capture"]  # the package's `capture` attribute is the function
    real = capture_module._plain_graph_module
    example = inputs_for("diffusers_dit", 2, 0)

    def labels_baked_in(exported, signature):
        module = real(exported, signature)
        module.register_buffer("baked_labels", example["class_labels"].clone())
        labels = [n for n in module.graph.nodes if n.op == "placeholder"][2]
        with module.graph.inserting_after(labels):
            constant = module.graph.get_attr("baked_labels")
        labels.replace_all_uses_with(constant)
        module.recompile()
        return module

    monkeypatch.setattr(capture_module, "_plain_graph_module", labels_baked_in)
    with pytest.raises(CaptureError, match="specialised input 'class_labels'"):
        capture(MODEL_FACTORIES["diffusers_dit"](), example, dynamic_batch=False)
