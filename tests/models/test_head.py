"""Every model family's output contract (nnfast.models.head): with targets the fused loss
returns no logits, ``return_logits=True`` returns them, and both give the same loss."""

import pytest
import torch
import torch.nn.functional as torch_F

import nnfast

FAMILIES = sorted(nnfast.models.list_models())


def _batch(model, vocab: int) -> dict:
    torch.manual_seed(1)
    x = torch.randint(0, vocab, (2, 12))
    y = torch.randint(0, vocab, (2, 12))
    if hasattr(model, "prepare_batch"):  # encoders: the task's own inputs and targets
        return model.prepare_batch(x, y)
    return {"idx": x, "targets": y}


@pytest.mark.parametrize("name", FAMILIES)
def test_return_logits_with_targets(name):
    torch.manual_seed(0)
    model = nnfast.models.create(name, "debug", vocab_size=29).eval()
    kw = _batch(model, 29)
    with torch.no_grad():
        fused_logits, fused_loss = model(**kw)
        logits, loss = model(**kw, return_logits=True)
        no_targets = model(**{**kw, "targets": None})
    targets = kw["targets"]
    assert logits is not None and logits.shape[:-1] == targets.shape
    classic = name in ("bigram", "mlp", "wavenet", "resmlp")  # small logits: always returned
    assert (fused_logits is not None) == classic
    assert no_targets[1] is None and no_targets[0].shape == logits.shape
    torch.testing.assert_close(no_targets[0], logits)
    smoothing = getattr(model.config, "label_smoothing", 0.0)
    expected = torch_F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(),
                                     label_smoothing=smoothing)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-5)
