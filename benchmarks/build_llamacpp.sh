#!/usr/bin/env bash
# Build llama.cpp's CPU tools (llama-bench, llama-completion, llama-perplexity, llama-mtmd-cli,
# llama-quantize) as the reference point for pocketvlm's benchmarks.
#
# The source comes from the llama-cpp-python sdist on PyPI (it vendors llama.cpp, .git included,
# under vendor/llama.cpp), because PyPI is the only place this project may fetch from.
# Nothing is built or copied into the repo: everything lives under $LLAMACPP_HOME
# (default ~/.cache/pocketvlm/llama.cpp).
#
# Usage: bash benchmarks/build_llamacpp.sh            # idempotent: skips work when binaries exist
#        LLAMACPP_JOBS=4 bash benchmarks/build_llamacpp.sh
#        LLAMACPP_FORCE=1 bash benchmarks/build_llamacpp.sh   # rebuild from scratch
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
HOME_DIR="${LLAMACPP_HOME:-$HOME/.cache/pocketvlm/llama.cpp}"
JOBS="${LLAMACPP_JOBS:-2}"
SRC="$HOME_DIR/src"
BUILD="$HOME_DIR/build"
BIN="$BUILD/bin"
INFO="$HOME_DIR/BUILD-INFO.txt"
# llama-cli needs the whole server (and its web UI) since 2025; llama-completion is the classic
# prompt->text tool and is all the benchmarks need.
TARGETS=(llama-bench llama-perplexity llama-completion llama-quantize llama-mtmd-cli)
# LLAMACPP_TARGETS="llama-mtmd-cli llama-completion" builds only those (the GGUF interop tests need no more).
if [[ -n "${LLAMACPP_TARGETS:-}" ]]; then read -r -a TARGETS <<<"$LLAMACPP_TARGETS"; fi
# One fix applied to the source, recorded in BUILD-INFO.txt: llama.cpp's LLaVA graph (tools/mtmd/models/
# llava.cpp) puts the class token after the patches while its inputs assume it first, so every CLIP/DINOv2
# LLaVA gets shifted position embeddings, loses patch 0 and feeds the class token to the LLM (llama.cpp
# issue #25814; the one-line fix is PR #25844, unmerged in 0.3.36). Without it no CLIP-tower LLaVA answers
# as the model does (measured: README, "llama.cpp interop").
# A second one-line fix makes llama-mtmd-cli flush its asynchronous logger before it exits: the logger is
# deliberately leaked (llama.cpp #22142), so a scripted run could lose the tail of the answer it printed.
# The same line in llama-completion (whose printed tokens and prompt listing go through that logger too).
PATCHES="llava-cls-first mtmd-cli-flush-log completion-flush-log"
apply_patches() {
    local cli="$SRC/tools/mtmd/mtmd-cli.cpp"
    if ! grep -q 'common_log_flush(common_log_main());' "$cli"; then
        sed -i 's/^    return g_is_interrupted ? 130 : 0;$/    common_log_flush(common_log_main());\n    return g_is_interrupted ? 130 : 0;/' "$cli"
    fi
    grep -q 'common_log_flush(common_log_main());' "$cli" || { echo "mtmd-cli-flush-log: patch target not found in $cli"; exit 1; }
    local comp="$SRC/tools/completion/completion.cpp"
    if ! grep -q 'common_log_flush(common_log_main());' "$comp"; then
        sed -i 's/^    llama_backend_free();$/    llama_backend_free();\n    common_log_flush(common_log_main());/' "$comp"
    fi
    grep -q 'common_log_flush(common_log_main());' "$comp" || { echo "completion-flush-log: patch target not found in $comp"; exit 1; }
    local f="$SRC/tools/mtmd/models/llava.cpp"
    if grep -q 'ggml_concat(ctx0, inp, model.class_embedding, 1)' "$f"; then
        sed -i 's/ggml_concat(ctx0, inp, model.class_embedding, 1)/ggml_concat(ctx0, model.class_embedding, inp, 1)/' "$f"
    fi
    grep -q 'ggml_concat(ctx0, model.class_embedding, inp, 1)' "$f" || { echo "llava-cls-first: patch target not found in $f"; exit 1; }
}

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    if [[ -x "$here/.venv/bin/python" ]]; then PY="$here/.venv/bin/python"; else PY=python3; fi
fi

# --- CPU features -> ggml flags. GGML_NATIVE=OFF so that -march=native cannot switch on AMX:
# AMX kernels die with SIGILL on these VMs even where cpuinfo lists the amx flags.
flags="$(grep -m1 '^flags' /proc/cpuinfo || true)"
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DGGML_NATIVE=OFF
    -DGGML_CPU_ALL_VARIANTS=OFF
    -DGGML_BACKEND_DL=OFF
    -DGGML_CUDA=OFF
    -DGGML_METAL=OFF
    -DGGML_VULKAN=OFF
    -DGGML_SSE42="$(has sse4_2)"
    -DGGML_AVX="$(has avx)"
    -DGGML_AVX2="$(has avx2)"
    -DGGML_FMA="$(has fma)"
    -DGGML_F16C="$(has f16c)"
    -DGGML_BMI2="$(has bmi2)"
    -DGGML_AVX_VNNI="$(has avx_vnni)"
    -DGGML_AVX512="$(has avx512f)"
    -DGGML_AVX512_VBMI="$(has avx512vbmi)"
    -DGGML_AVX512_VNNI="$(has avx512_vnni)"
    -DGGML_AVX512_BF16="$(has avx512_bf16)"
    -DGGML_AMX_TILE=OFF
    -DGGML_AMX_INT8=OFF
    -DGGML_AMX_BF16=OFF
    -DLLAMA_CURL=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_SERVER=OFF
    -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_TOOLS=ON
)
FLAGS_LINE="${CMAKE_FLAGS[*]}"

all_built() {
    for t in "${TARGETS[@]}"; do [[ -x "$BIN/$t" ]] || return 1; done
}

src_commit="$(git -C "$SRC" rev-parse HEAD 2>/dev/null || echo unknown)"
if [[ "${LLAMACPP_FORCE:-0}" != 1 ]] && all_built && [[ -f "$INFO" ]] \
        && grep -qxF "cmake_flags: $FLAGS_LINE" "$INFO" \
        && grep -qxF "llama_cpp_commit: $src_commit" "$INFO" \
        && grep -qxF "llama_cpp_python: $VERSION" "$INFO" \
        && grep -qxF "patches: $PATCHES" "$INFO"; then
    echo "llama.cpp tools already built ($(grep '^llama_cpp_commit:' "$INFO"))"
    echo "binaries: $BIN"
    exit 0
fi
# A build for another CPU (e.g. with AVX-512 copied onto an AVX2-only VM) would die with SIGILL:
# when the flags differ from what this CPU wants, start over.
if [[ -f "$INFO" ]] && ! grep -qxF "cmake_flags: $FLAGS_LINE" "$INFO"; then
    echo "previous build used other flags; rebuilding"
    rm -rf "$BUILD"
fi
if [[ "${LLAMACPP_FORCE:-0}" == 1 ]]; then rm -rf "$BUILD"; fi

mkdir -p "$HOME_DIR"
if [[ ! -f "$SRC/.version" ]] || [[ "$(cat "$SRC/.version")" != "$VERSION" ]]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    echo "downloading llama-cpp-python==$VERSION sdist from PyPI"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
    tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
    sdist="$tmp/llama_cpp_python-$VERSION"
    # vendor/llama.cpp/.git is a submodule pointer into the sdist's own .git/modules: make it a
    # real git dir so that the commit (cmake's build-info, llama-bench's build_commit) survives.
    if [[ -d "$sdist/.git/modules/vendor/llama.cpp" ]]; then
        rm -f "$sdist/vendor/llama.cpp/.git"
        mv "$sdist/.git/modules/vendor/llama.cpp" "$sdist/vendor/llama.cpp/.git"
        git config --file "$sdist/vendor/llama.cpp/.git/config" --unset core.worktree || true
    fi
    rm -rf "$SRC" "$BUILD"
    mv "$sdist/vendor/llama.cpp" "$SRC"
    echo "$VERSION" >"$SRC/.version"
fi

apply_patches
commit="$(git -C "$SRC" rev-parse HEAD 2>/dev/null || echo unknown)"
# The vendored clone is shallow, so a commit count would be meaningless: record the date instead.
commit_date="$(git -C "$SRC" log -1 --format=%cI 2>/dev/null || echo unknown)"

kind=fresh; [[ -f "$BUILD/CMakeCache.txt" ]] && kind=incremental
start=$(date +%s)
cmake -S "$SRC" -B "$BUILD" "${CMAKE_FLAGS[@]}" >"$HOME_DIR/cmake-configure.log" 2>&1 \
    || { tail -40 "$HOME_DIR/cmake-configure.log"; exit 1; }
# One target at a time, most needed first, so llama-bench is usable while the rest still compiles.
for t in "${TARGETS[@]}"; do
    cmake --build "$BUILD" --config Release -j "$JOBS" --target "$t"
done
secs=$(( $(date +%s) - start ))

# Check that the binaries run here and carry no AMX (tile) instructions, and no AVX-512 (zmm)
# code when this CPU lacks it: either would be a SIGILL waiting to happen.
CHECK="$BIN/${TARGETS[0]}"
"$CHECK" --help >/dev/null 2>&1 || { echo "${TARGETS[0]} does not run on this CPU"; exit 1; }
isa_check="objdump not found: instruction check skipped"
if command -v objdump >/dev/null; then
    dis="$(objdump -d --no-show-raw-insn "$CHECK")"
    amx=$(grep -cwE '(ldtilecfg|tileloadd|tileloaddt1|tdpb[su][su]d|tdpbf16ps|tdpfp16ps)' <<<"$dis" || true)
    zmm=$(grep -c '%zmm' <<<"$dis" || true)
    if (( amx > 0 )); then echo "${TARGETS[0]} contains $amx AMX instructions"; exit 1; fi
    if [[ "$(has avx512f)" == OFF ]] && (( zmm > 0 )); then
        echo "${TARGETS[0]} uses AVX-512 ($zmm zmm instructions) but this CPU has none"; exit 1
    fi
    isa_check="${TARGETS[0]}: $amx AMX instructions, $zmm instructions on zmm registers"
fi

{
    echo "llama_cpp_python: $VERSION"
    echo "llama_cpp_commit: $commit"
    echo "llama_cpp_commit_date: $commit_date"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) in ${secs}s with -j$JOBS ($kind build)"
    echo "compiler: $(${CXX:-c++} --version | head -1)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "cmake_flags: $FLAGS_LINE"
    echo "patches: $PATCHES"
    echo "targets: ${TARGETS[*]}"
    echo "isa_check: $isa_check"
    echo "binaries: $BIN"
} >"$INFO"
cat "$INFO"
echo "binaries: $BIN"
