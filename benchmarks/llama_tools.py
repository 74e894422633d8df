"""llama.cpp's own tools, built from the llama-cpp-python sdist that matches the installed wheel.

The sdist of llama-cpp-python carries llama.cpp's whole source (vendor/llama.cpp). This helper
downloads it with pip (from the package registry, or pip's cache), builds llama-quantize,
llama-perplexity, llama-imatrix and llama-bench with cmake (Release, GGML_NATIVE=OFF) into a cache
directory and reuses that build when it is there:

    cache: $MOEPLAN_LLAMA_CPP_DIR, else ~/.cache/moeplan/llama.cpp-<version>/
      src/          the unpacked llama.cpp source (convert_hf_to_gguf.py, gguf-py/, tools/)
      build/bin/    the binaries

    python benchmarks/llama_tools.py            # build (or find) and print the paths
    python benchmarks/llama_tools.py --check    # print the paths only if already built, else exit 1

    from llama_tools import llama_tools
    tools = llama_tools()           # LlamaTools(quantize=..., perplexity=..., imatrix=..., bench=...,
                                    #            convert=..., gguf_py=..., version=...)

Repacking: on CPUs with AMX this build of llama.cpp crashes on quantized files unless weight
repacking is off; pass tools.perplexity_norepack (`-nr`, "--no-repack" in this version's --help) to
llama-perplexity / llama-imatrix and `--repack 0` to llama-bench.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from moeplan.kernels.outputs import output_dir, write_text

PINNED_VERSION = "0.3.36"
TARGETS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-bench")
# flags that turn weight repacking off (AMX/CPU "extra" buffer types); see the module docstring
NO_REPACK = {"llama-perplexity": ["-nr"], "llama-imatrix": ["-nr"], "llama-bench": ["--repack", "0"]}


@dataclass(frozen=True)
class LlamaTools:
    version: str
    root: Path            # the cache directory
    quantize: Path
    perplexity: Path
    imatrix: Path
    bench: Path
    convert: Path         # convert_hf_to_gguf.py
    gguf_py: Path         # the gguf-py the converter was written against (put on PYTHONPATH)

    def converter_env(self) -> dict[str, str]:
        """The environment for running convert_hf_to_gguf.py with the sdist's own gguf-py."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.gguf_py)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        return env


def llama_version() -> str:
    """The installed llama_cpp_python's version, else the pinned one."""
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return PINNED_VERSION


def cache_dir(version: str | None = None) -> Path:
    version = version or llama_version()
    env = os.environ.get("MOEPLAN_LLAMA_CPP_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "moeplan" / f"llama.cpp-{version}"


def _paths(root: Path, version: str) -> LlamaTools:
    src, bin_ = root / "src", root / "build" / "bin"
    return LlamaTools(version=version, root=root,
                      quantize=bin_ / "llama-quantize", perplexity=bin_ / "llama-perplexity",
                      imatrix=bin_ / "llama-imatrix", bench=bin_ / "llama-bench",
                      convert=src / "convert_hf_to_gguf.py", gguf_py=src / "gguf-py")


def _built(t: LlamaTools) -> bool:
    return all(p.is_file() for p in (t.quantize, t.perplexity, t.imatrix, t.bench, t.convert)) \
        and t.gguf_py.is_dir()


def find_llama_tools(version: str | None = None) -> LlamaTools | None:
    """The built tools if they are in the cache, else None (never builds)."""
    version = version or llama_version()
    t = _paths(cache_dir(version), version)
    return t if _built(t) else None


def _log(msg: str) -> None:
    print(f"[llama_tools] {msg}", file=sys.stderr, flush=True)


def _fetch_source(version: str, root: Path) -> Path:
    src = root / "src"
    if (src / "CMakeLists.txt").is_file() and (src / "convert_hf_to_gguf.py").is_file():
        return src
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        _log(f"downloading the llama-cpp-python {version} sdist")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--no-binary", "llama-cpp-python", f"llama-cpp-python=={version}", "-d", tmp],
                       check=True)
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz")) + \
            list(Path(tmp).glob("llama-cpp-python-*.tar.gz"))
        if not archives:
            raise RuntimeError(f"pip download left no sdist in {tmp}: {os.listdir(tmp)}")
        with tarfile.open(archives[0]) as tar:
            prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix) and (m.isfile() or m.isdir()):
                    m.name = m.name[len(prefix):]
                    if m.name and m.name.split("/")[0] != ".git":  # a submodule's gitfile
                        members.append(m)
            if src.exists():  # an unfinished source tree (the check above failed)
                shutil.rmtree(src)
            with output_dir(src, "llama.cpp source") as staged:
                tar.extractall(staged, members=members, filter="data")
    return src


def build_llama_tools(version: str | None = None, jobs: int = 2, force: bool = False) -> LlamaTools:
    """Fetch and build llama.cpp's tools into the cache directory, or find them there."""
    version = version or llama_version()
    root = cache_dir(version)
    t = _paths(root, version)
    if _built(t) and not force:
        return t
    src = _fetch_source(version, root)
    build = root / "build"
    t0 = time.time()
    _log(f"configuring llama.cpp {version} in {build}")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_OPENMP=ON"], check=True,
                   stdout=subprocess.DEVNULL)
    _log(f"building {', '.join(TARGETS)} with -j{jobs}")
    subprocess.run(["cmake", "--build", str(build), "--config", "Release", f"-j{jobs}",
                    "--target", *TARGETS], check=True, stdout=subprocess.DEVNULL)
    if not _built(t):
        raise RuntimeError(f"the llama.cpp build in {build} did not produce {TARGETS}")
    write_text(root / "build-seconds.txt", f"{time.time() - t0:.0f}\n")
    _log(f"built in {time.time() - t0:.0f} s")
    return t


def llama_tools(build: bool = True) -> LlamaTools:
    """The tools: built (or found in the cache) when build, else found or RuntimeError."""
    if build:
        return build_llama_tools()
    t = find_llama_tools()
    if t is None:
        raise RuntimeError(f"llama.cpp tools not built in {cache_dir()}; "
                           f"run python benchmarks/llama_tools.py")
    return t


_CONVERT_WRAPPER = """
import runpy, sys
src, convert, pre, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
sys.path.insert(0, src)
import conversion.base as base
_orig = base.TextModel.get_vocab_base_pre
def _pre(self, tokenizer):
    try:
        return _orig(self, tokenizer)
    except NotImplementedError:  # a tokenizer the converter's hash table does not list
        return pre
base.TextModel.get_vocab_base_pre = _pre
sys.argv = [convert, *args]
runpy.run_path(convert, run_name="__main__")
"""


def convert_hf_to_gguf(tools: LlamaTools, model_dir: str | os.PathLike, out: str | os.PathLike,
                       outtype: str = "f32") -> Path:
    """llama.cpp's convert_hf_to_gguf.py on a temporary copy of checkpoint `model_dir`.

    The copy's config.json gets "scoring_func": "sigmoid" for DeepSeek-V3 (transformers' config
    leaves it out, the converter needs it for the gating function). The converter recognizes
    pre-tokenizers by a hash of a test string's tokens; for a tokenizer it does not list (the
    bundled tiny models' trained BPE), tokenizer.ggml.pre is the name moeplan's GGUF writer
    detects from tokenizer.json (kernels.gguf_vocab.detect_pre_tokenizer), set by wrapping the
    converter's get_vocab_base_pre (the converter's own code runs unchanged)."""
    import json

    from moeplan.kernels.gguf_vocab import detect_pre_tokenizer

    model_dir, out = Path(model_dir), Path(out)
    with tempfile.TemporaryDirectory(prefix="moeplan-convert-") as tmp:
        ckpt = Path(tmp) / model_dir.name
        shutil.copytree(model_dir, ckpt)
        cfg = json.loads((ckpt / "config.json").read_text())
        if cfg.get("model_type") == "deepseek_v3" and "scoring_func" not in cfg:
            cfg["scoring_func"] = "sigmoid"
            (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
        tok = ckpt / "tokenizer.json"
        pre = detect_pre_tokenizer(json.loads(tok.read_text()).get("pre_tokenizer")) if tok.exists() else "default"
        r = subprocess.run([sys.executable, "-c", _CONVERT_WRAPPER, str(tools.convert.parent), str(tools.convert),
                            pre, str(ckpt), "--outtype", outtype, "--outfile", str(out)],
                           env=tools.converter_env(), capture_output=True, text=True)
        if r.returncode != 0 or not out.exists():
            raise RuntimeError(f"convert_hf_to_gguf.py failed on {model_dir}:\n{r.stderr[-3000:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="do not build; exit 1 when not built")
    ap.add_argument("--force", action="store_true", help="rebuild even when the cache has a build")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    a = ap.parse_args(argv)
    if a.check:
        t = find_llama_tools()
        if t is None:
            print(f"not built in {cache_dir()}", file=sys.stderr)
            return 1
    else:
        t = build_llama_tools(jobs=a.jobs, force=a.force)
    for k in ("version", "root", "quantize", "perplexity", "imatrix", "bench", "convert", "gguf_py"):
        print(f"{k}: {getattr(t, k)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
