"""Count the SASS instructions of the quant decode kernels' inner loops, on a machine without a GPU.

The decode kernels (ffsplit/kernels/qffn.py) are bound by instructions per code, not by bytes
(bench/results/NOTES-h200.md): this compiles one configuration of ``_qfirst_kernel`` or
``_qlast_kernel`` for sm_90 with Triton's own ptxas and cuobjdump (``triton`` must be importable:
it is not a dependency of the CPU install; ``pip install triton==3.6.0`` into any folder on
PYTHONPATH) and prints, for the hottest loop (the basic block between the loop's backward-branch
target and that branch, the longest such loop), its instruction mix and the instructions per
code it streams. Device time is scarce; this makes a kernel change measurable before it is run.

    PYTHONPATH=/tmp/tri python scripts/sass_count.py first --tokens 16 --bits 4 --tiles 32,64,8,3,4,1,96
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ffsplit.kernels import qffn  # noqa: E402
from ffsplit.kernels.qlayout import CODES_PER_UNIT, planes  # noqa: E402

POINTERS = {
    "x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "h_ptr": "*fp32", "ws_ptr": "*fp32",
    "cnt_ptr": "*i32", "y_ptr": "*bf16", "bias_ptr": "*bf16",
}  # fmt: skip


def _signature(kernel, stage: str, bits: int) -> tuple[dict, dict]:
    sig: dict[str, str] = {}
    attrs: dict = {}
    unit = {4: "*i32", 2: "*i32", 8: "*i32"}
    for i, p in enumerate(kernel.params):
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
            continue
        if name in POINTERS:
            sig[name] = POINTERS[name]
            if stage == "last" and name == "h_ptr":
                sig[name] = "*fp32"
        elif re.fullmatch(r"[abc][012]", name):
            width = planes(bits)[int(name[1])][0] if int(name[1]) < len(planes(bits)) else 4
            per_unit = CODES_PER_UNIT[bits]
            sig[name] = {8: "*i8", 16: "*i16", 32: "*i32"}.get(width * per_unit, unit[4])
        elif re.fullmatch(r"[abc]_[sz]", name):
            sig[name] = "*fp16"
        else:
            sig[name] = "i32"
        if sig[name].startswith("*") or name in ("d", "stride_x", "stride_h", "stride_y"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_sass(stage: str, tokens: int, bits: int, tiles: qffn.Tiles, group: int) -> str:
    kernel = qffn._qfirst_kernel if stage == "first" else qffn._qlast_kernel
    sig, attrs = _signature(kernel, stage, bits)
    per_unit = CODES_PER_UNIT[bits]
    const = {
        "BITS_A": bits, "E_A": per_unit, "PLANES_A": len(planes(bits)),
        "BITS_B": 0, "E_B": 8, "PLANES_B": 1, "BITS_C": 0, "E_C": 8, "PLANES_C": 1,
        "GROUP": group,
        "BLOCK_T": 1 if tokens == 1 and not (stage == "first" and tiles.group_dot) else qffn.MAX_TOKENS,
        "SPLIT": tiles.split, "STAGES": tiles.stages, "EVEN": True,
    }  # fmt: skip
    if stage == "first":
        const.update(GATED=True, ACT="silu", HAS_BIAS=False, BLOCK_N=tiles.block_n,
                     BLOCK_K=tiles.block_k, GROUP_DOT=tiles.group_dot)  # fmt: skip
    else:
        const.update(HAS_BIAS=False, HAS_DENSE=True, BLOCK_J=tiles.block_n,
                     BLOCK_O=min(tiles.block_k, group), HALF=tiles.group_dot == 2)  # fmt: skip
    for name in const:
        sig[name] = "constexpr"
    src = ASTSource(
        kernel,
        sig,
        constexprs={(kernel.arg_names.index(k),): v for k, v in const.items()},
        attrs=attrs,
    )
    options = {"num_warps": tiles.warps, "num_stages": tiles.stages}
    if tiles.maxnreg:
        options["maxnreg"] = tiles.maxnreg
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True).stdout
    return sass


def loops(sass: str) -> list[list[str]]:
    """Instruction lists of every backward-branch loop body (target label .. branch)."""
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]+)\*/", ln).group(1), 16) for ln in lines]
    out = []
    for i, ln in enumerate(lines):
        m = re.search(r"BRA\s.*?0x([0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < addr[i]:
            start = addr.index(int(m.group(1), 16)) if int(m.group(1), 16) in addr else None
            if start is not None:
                out.append(lines[start : i + 1])
    return out


def opcode(line: str) -> str:
    body = re.sub(r"\s+/\*[0-9a-f]+\*/\s+", "", line, count=1).strip()
    body = re.sub(r"^@!?U?P[T0-9]+\s+", "", body)
    return body.split()[0].split(".")[0] if body else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("stage", choices=["first", "last"])
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--tiles", default="", help="bn,bk,split,stages,warps,group_dot,maxnreg")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.tiles:
        tiles = qffn.Tiles(*[int(v) for v in args.tiles.split(",")])
    else:
        tiles = qffn.TILES[args.stage, "one" if args.tokens == 1 else "tile"]
    sass = compile_sass(args.stage, args.tokens, args.bits, tiles, args.group)
    bodies = loops(sass)
    if not bodies:
        raise SystemExit("no loop found in the SASS")
    body = max(bodies, key=len)
    mix = collections.Counter(opcode(ln) for ln in body)
    # codes per loop iteration: one [block_n, block_k] tile of one projection (gate and up are
    # two loops) for first; [block_j, block_o] for last
    if args.stage == "first":
        codes = tiles.block_n * tiles.block_k
    else:
        codes = tiles.block_n * min(tiles.block_k, args.group)
    threads = 32 * tiles.warps
    # issue slots per code, counted as thread-instructions (a warp instruction is 32 of them):
    # at 3.3 TB/s of 4-bit codes an H100/H200 can issue ~5 per code (NOTES-h200.md)
    per_code = len(body) * tiles.warps * 32 / codes
    result = {
        "stage": args.stage, "tokens": args.tokens, "bits": args.bits, "tiles": str(tiles),
        "loop_instructions": len(body), "loops": sorted((len(b) for b in bodies), reverse=True), "codes_per_iteration": codes, "threads": threads,
        "instructions_per_code": round(per_code, 2), "mix": dict(mix.most_common()),
    }  # fmt: skip
    print(json.dumps(result, indent=None if args.json else 1))


if __name__ == "__main__":
    main()
