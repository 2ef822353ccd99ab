"""The split is a tested invariant (style.md, 3): with dense blocks, logits equal the dense model's."""

import pytest
import torch

from ffsplit.adapters import get_adapter
from ffsplit.models.tiny import TINY_ARCHITECTURES, tiny_model
from ffsplit.split import build_split, dense_block, swap_ffn
from ffsplit.split.modules import SplitInProjection, SplitOutProjection
from ffsplit.split.parts import build_part


def _outputs(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _split_all(model, heavy_ratio=0.25, seed=1):
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(seed)
    for handle in adapter.ffns(model):
        w = adapter.weights(model, handle)
        perm = torch.randperm(w.neurons, generator=gen)
        k = int(heavy_ratio * w.neurons)
        blocks = [(perm[:k], dense_block), (perm[k:], dense_block)]
        swap_ffn(model, adapter, handle, build_split(w, blocks))
    return adapter


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_identity_split_equals_dense(architecture):
    model, _ = tiny_model(architecture)
    ids = torch.randint(0, 150, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = _outputs(model, ids)
        adapter = _split_all(model)
        split = _outputs(model, ids)
    torch.testing.assert_close(split, reference, rtol=1e-5, atol=1e-5)
    for handle in adapter.ffns(model):
        assert isinstance(model.get_submodule(handle.up_path), SplitOutProjection)
        assert isinstance(model.get_submodule(handle.down_path), SplitInProjection)


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "OPTForCausalLM", "GPT2LMHeadModel"])
def test_generate_works_after_split(architecture):
    model, _ = tiny_model(architecture)
    ids = torch.randint(0, 150, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        _split_all(model)
        split = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(reference, split)


def test_specs_rebuild_structure():
    model, _ = tiny_model("OPTForCausalLM")
    adapter = _split_all(model)
    handle = adapter.ffns(model)[0]
    for path in handle.projection_paths:
        module = model.get_submodule(path)
        rebuilt = build_part(module.spec())
        rebuilt.load_state_dict(module.state_dict())
        torch.testing.assert_close(rebuilt.dense_weight(), module.dense_weight())
        assert rebuilt.nbytes() == module.nbytes()
