import pytest
import torch
from torch import nn

from ffsplit.errors import FFSplitError
from ffsplit.eval.size import SizeReport, model_size, size_reduction

# Tiny Llama of conftest: vocab 128, d 32, m 64, 2 layers, 4 heads of 8, 2 KV heads.
D, M, VOCAB, LAYERS, KV = 32, 64, 128, 2, 16
FFN_PARAMS = LAYERS * 3 * D * M
ATTENTION_PARAMS = LAYERS * (D * D + D * KV + D * KV + D * D)
NORM_PARAMS = LAYERS * 2 * D + D
EMBEDDING_PARAMS = VOCAB * D


def _ffn_projections(model):
    return [
        proj
        for layer in model.model.layers
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
    ]


class PackedCodes(nn.Module):
    """Test part: 4-bit codes packed two per uint8, one fp16 scale and zero per row (group = row)."""

    bits = 4

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
        )
        self.register_buffer("scales", torch.ones(out_features, 1, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, 1, dtype=torch.float16))

    def nbytes(self) -> int:
        return self.out_features * self.in_features // 2 + 2 * 2 * self.out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


class Factored(nn.Module):
    """Test part with its own parameter count (parameter_count) and nbytes()."""

    def __init__(self, out_features: int, in_features: int, rank: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(out_features, rank))
        self.b = nn.Parameter(torch.zeros(rank, in_features))

    def nbytes(self) -> int:
        return 2 * (self.a.numel() + self.b.numel())

    def parameter_count(self) -> int:
        return self.a.numel() + self.b.numel()

    def forward(self, x):
        return x @ self.b.T @ self.a.T


def test_dense_model_counts_16_bit_bytes_and_hand_computed_shares(tiny_llama):
    report = model_size(tiny_llama, ffn_modules=_ffn_projections(tiny_llama))
    total = FFN_PARAMS + ATTENTION_PARAMS + NORM_PARAMS + 2 * EMBEDDING_PARAMS
    assert report.total_params == total == sum(p.numel() for p in tiny_llama.parameters())
    assert report.total_bytes == 2 * total  # fp32 in memory, counted at 16 bits
    assert report.ffn_params == FFN_PARAMS
    assert report.ffn_bytes == 2 * FFN_PARAMS
    assert report.embedding_params == 2 * EMBEDDING_PARAMS  # input embedding + untied head
    assert report.non_embedding_params == total - 2 * EMBEDDING_PARAMS
    assert report.ffn_modules == 6
    assert report.ffn_byte_share == pytest.approx(FFN_PARAMS / total)


def test_dtype_in_memory_does_not_change_the_count(tiny_llama):
    fp32 = model_size(tiny_llama, _ffn_projections(tiny_llama))
    bf16 = model_size(tiny_llama.to(torch.bfloat16), _ffn_projections(tiny_llama))
    assert fp32 == bf16


def test_tied_embeddings_are_counted_once(llama_factory):
    model = llama_factory(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = model_size(model)
    assert report.total_params == FFN_PARAMS + ATTENTION_PARAMS + NORM_PARAMS + EMBEDDING_PARAMS
    assert report.embedding_params == EMBEDDING_PARAMS
    assert report.ffn_params == 0 and report.ffn_modules == 0


def test_ffn_containers_and_repeated_modules_count_once(tiny_llama):
    mlps = [layer.mlp for layer in tiny_llama.model.layers]
    by_container = model_size(tiny_llama, ffn_modules=mlps + mlps)
    by_projection = model_size(tiny_llama, ffn_modules=_ffn_projections(tiny_llama))
    assert by_container.ffn_bytes == by_projection.ffn_bytes == 2 * FFN_PARAMS


def test_self_sized_modules_use_nbytes_and_the_params_rule(tiny_llama):
    dense = model_size(tiny_llama, _ffn_projections(tiny_llama))
    mlp = tiny_llama.model.layers[0].mlp
    mlp.down_proj = PackedCodes(D, M)  # codes: D*M 4-bit values, plus 2*D fp16 scale/zero values
    mlp.up_proj = Factored(M, D, rank=4)
    report = model_size(tiny_llama, _ffn_projections(tiny_llama))

    packed_bytes = D * M // 2 + 4 * D
    factored_params = 4 * (M + D)
    expected_ffn_bytes = 2 * FFN_PARAMS - 2 * 2 * D * M + packed_bytes + 2 * factored_params
    assert report.ffn_bytes == expected_ffn_bytes
    assert report.total_bytes == dense.total_bytes - dense.ffn_bytes + expected_ffn_bytes
    expected_ffn_params = FFN_PARAMS - 2 * D * M + (D * M + 2 * D) + factored_params
    assert report.ffn_params == expected_ffn_params

    reduction = size_reduction(dense, report)
    assert reduction["ffn_reduction"] == pytest.approx(1 - expected_ffn_bytes / (2 * FFN_PARAMS))
    assert 0 < reduction["model_reduction"] < reduction["ffn_reduction"]


def test_self_sized_module_is_not_descended_into(tiny_llama):
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(M, D)  # 16-bit rule would give 2 * (M*D + D) bytes

        def nbytes(self) -> int:
            return 7

        def forward(self, x):
            return self.inner(x)

    wrapper = Wrapper()
    tiny_llama.model.layers[1].mlp.down_proj = wrapper
    report = model_size(tiny_llama, _ffn_projections(tiny_llama))
    assert report.ffn_bytes == 2 * FFN_PARAMS - 2 * D * M + 7
    assert report.ffn_params == FFN_PARAMS + D  # the inner bias is a float parameter too
    with pytest.raises(FFSplitError, match="nbytes"):
        model_size(tiny_llama, [wrapper.inner])


def test_foreign_ffn_module_is_a_user_error(tiny_llama):
    with pytest.raises(FFSplitError, match="not a submodule"):
        model_size(tiny_llama, [nn.Linear(4, 4)])


def test_report_round_trips_to_a_plain_dict(tiny_llama):
    report = model_size(tiny_llama, _ffn_projections(tiny_llama))
    values = report.to_dict()
    assert values["ffn_bytes"] == report.ffn_bytes
    assert values["ffn_byte_share"] == report.ffn_byte_share
    fields = {k: v for k, v in values.items() if k in SizeReport.__dataclass_fields__}
    assert SizeReport(**fields) == report
    with pytest.raises(FFSplitError):
        SizeReport(**{**fields, "ffn_bytes": report.total_bytes + 1})
