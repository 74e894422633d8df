"""Run a causal LM whose weights stay on disk: one decoder layer in memory at a time.

    sm = StreamingModel("path/to/checkpoint")           # the architecture on the meta device
    h, kw = sm.embed(batch)                              # embeddings + the layers' keyword arguments
    for i in range(sm.n_layers):
        with sm.layer(i) as layer:                       # layer i's weights read from the shards
            h = layer(h, **kw)                           # ... and dropped again on leaving
    log_probs = sm.head(h)

The model is built from config.json on torch's meta device (real shapes, no memory); a part's
parameters are read from the checkpoint by `kernels.checkpoint.Checkpoint` (BF16 / F16 / F32, FP8
dequantized, sharded) just before it runs and released after, so the process holds the largest
decoder layer in the compute dtype plus the activations, whatever the model's size. Routed experts
stored one tensor per expert are filled into transformers' fused (E, 2I, H) / (E, H, I) parameters.
Layers a checkpoint has beyond the config's (DeepSeek-V3's multi-token-prediction layer) are never
read.

The arithmetic is transformers' own: the same modules run on the same inputs, so the outputs equal
an in-memory model's bit for bit (tests check it).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from moeplan.kernels.checkpoint import Checkpoint, read_json

from .adapters import ExpertKind, adapter_for


class _Stop(Exception):
    pass


def release_memory() -> None:
    """Give the memory freed since the last call back to the operating system.

    glibc's malloc keeps freed blocks in its arenas for reuse, and after a large block is freed it
    raises its own threshold for serving blocks by mmap, so the tensors of one layer (weights,
    quantized copies, activations) come back as heap that later layers fragment: on a generated
    12-layer checkpoint the resident size grew by about 12 MB per forward step and 16 MB per backward
    step without this, and stays flat with it (tests/test_layerwise.py checks the peak on 24 layers).
    Elsewhere (other C libraries, macOS) this does nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        import ctypes
        import ctypes.util

        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)
    except OSError:
        return None


class StreamingModel:
    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        self.dtype, self.device = dtype, torch.device(device)
        config = read_json(self.model_dir / "config.json", "config")
        self.ckpt = Checkpoint(self.model_dir, config)
        hf_config = AutoConfig.from_pretrained(str(self.model_dir))
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        self.model.eval()
        self.ad = adapter_for(self.model)
        self.layers = self.ad.decoder_layers
        self.n_layers = len(self.layers)
        base = getattr(self.model, self.model.base_model_prefix)
        self._base = base
        self._prefix = {id(m): n for n, m in self.model.named_modules()}
        # rotary tables are non-persistent buffers computed at construction: rebuild them for real
        rot = getattr(base, "rotary_emb", None)
        if rot is not None:
            with torch.device(self.device):
                base.rotary_emb = type(rot)(config=hf_config)

    def close(self) -> None:
        self.ckpt.close()

    # ---- loading and releasing parts ----------------------------------------------------------

    @contextlib.contextmanager
    def loaded(self, module: nn.Module) -> Iterator[nn.Module]:
        """`module` with its weights read from the checkpoint; back on the meta device afterwards."""
        self._load(module)
        try:
            yield module
        finally:
            module.to_empty(device="meta")

    def _load(self, module: nn.Module) -> None:
        prefix = self._prefix[id(module)]
        module.to_empty(device=self.device)
        layer = self._layer_index(prefix)
        filled = set()
        if layer is not None and layer in self.ad.moe_layers():
            experts = self.ad.experts_module(layer)
            ex_prefix = self._experts_prefix(layer)
            for e in range(self.ad.n_experts(layer)):
                self.ad.set_expert_weights(layer, e, {
                    k: self.ckpt.expert(ex_prefix, e, self.ad.checkpoint_expert_names[k]).to(self.dtype)
                    for k in ExpertKind})
            ep = self._prefix[id(experts)]
            filled |= {f"{ep}.{n}" for n, _ in experts.named_parameters()}
        with torch.no_grad():
            for rel, t in [*module.named_parameters(), *module.named_buffers()]:
                name = f"{prefix}.{rel}" if prefix else rel
                if name in filled:
                    continue
                src = self._source(name, layer, t)
                if tuple(self.ckpt.shape(src)) != tuple(t.shape):
                    raise ValueError(f"{self.model_dir}: {src} is {list(self.ckpt.shape(src))} in the checkpoint, "
                                     f"the config's architecture needs {list(t.shape)}")
                self._fill(t, src)

    def _source(self, name: str, layer: int | None, t: torch.Tensor) -> str:
        """The checkpoint tensor that module tensor `name` (`t`) is read from."""
        src = self.ad.checkpoint_name(name, layer)
        if src not in self.ckpt and t is getattr(self.model.get_input_embeddings(), "weight", None):
            src = self._prefix[id(self.model.get_input_embeddings())] + ".weight"  # tied head
        if src not in self.ckpt:
            raise ValueError(f"{self.model_dir}: the checkpoint has no tensor {src} (needed by {name})")
        return src

    def checkpoint_source(self, module: nn.Module, rel: str = "weight") -> str:
        """The checkpoint name of a loaded module's tensor `rel` (a tied head's is the embedding's)."""
        prefix = self._prefix[id(module)]
        name = f"{prefix}.{rel}" if prefix else rel
        return self._source(name, self._layer_index(prefix), getattr(module, rel))

    def _fill(self, t: torch.Tensor, src: str) -> None:
        """Checkpoint tensor `src` written into `t`; a matrix a chunk of rows at a time (an embedding or
        a head is never held twice in float32). The same values as one read: rows convert on their own
        and FP8 chunks start on a scale block."""
        shape = self.ckpt.shape(src)
        step = self.ckpt.row_chunk(src) if len(shape) == 2 else 0
        if not step or shape[0] <= step:
            t.copy_(self.ckpt.read(src).to(t.dtype))
            return
        for r0 in range(0, shape[0], step):
            r1 = min(shape[0], r0 + step)
            t[r0:r1].copy_(self.ckpt.read(src, rows=(r0, r1)).to(t.dtype))

    def reread(self, live: torch.Tensor, layer: int, name: str | None = None, kind: ExpertKind | None = None) -> None:
        """Write a loaded tensor's checkpoint values into it again, bit for bit what loading wrote: the
        checkpoint tensor `name`, or kind `kind` of every routed expert of `layer` (`live`: that kind's
        (experts, rows, cols) stack). One expert at a time: nothing of the tensor's size is allocated."""
        with torch.no_grad():
            if kind is None:
                if tuple(self.ckpt.shape(name)) != tuple(live.shape):
                    raise ValueError(f"{self.model_dir}: {name} is {list(self.ckpt.shape(name))} in the checkpoint, "
                                     f"the live tensor {list(live.shape)}: it is not one checkpoint tensor and cannot "
                                     "be read back")
                self._fill(live, name)
                return
            prefix = self._experts_prefix(layer)
            for e in range(live.shape[0]):
                live[e].copy_(self.ckpt.expert(prefix, e, self.ad.checkpoint_expert_names[kind]).to(self.dtype))

    def _experts_prefix(self, layer: int) -> str:
        return self.ad.expert_tensor_name(layer, 0, ExpertKind.GATE).split(".experts.")[0] + ".experts"

    def _layer_index(self, prefix: str) -> int | None:
        lp = self.ad.layers_prefix + "."
        if prefix.startswith(lp):
            return int(prefix[len(lp):].split(".")[0])
        return None

    def layer(self, i: int):
        """Context manager: decoder layer i with its weights loaded."""
        return self.loaded(self.layers[i])

    # ---- the three stages of a forward pass -------------------------------------------------

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Layer 0's input for token ids `batch` (B, T) and the keyword arguments every decoder layer
        gets (attention mask, rotary embeddings), exactly as the model's own forward computes them."""
        emb = self.model.get_input_embeddings()
        captured = {}

        def grab(_mod, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            captured["kw"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _Stop

        handle = self.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with self.loaded(emb):
                try:
                    self._base(input_ids=batch.to(self.device), use_cache=False)
                except _Stop:
                    pass
        finally:
            handle.remove()
        return captured["h"], captured["kw"]

    @torch.inference_mode()
    def run_layer(self, layer: nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
        out = layer(h, **kw)
        return out[0] if isinstance(out, tuple) else out

    @torch.inference_mode()
    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities (B, T-1, V) from the last decoder layer's output."""
        from .evaluate import _next_token_log_probs

        norm, head = self._base.norm, self.model.get_output_embeddings()
        with self.loaded(norm), contextlib.ExitStack() as stack:
            if head.weight.is_meta:
                stack.enter_context(self.loaded(head))
            return _next_token_log_probs(head(norm(h)))

    @torch.inference_mode()
    def log_probs(self, batch: torch.Tensor) -> torch.Tensor:
        """The whole forward pass for one batch (each layer loaded in turn): for tests and small runs;
        a profile instead runs every batch through a layer before loading the next."""
        h, kw = self.embed(batch)
        for i in range(self.n_layers):
            with self.layer(i) as layer:
                h = self.run_layer(layer, h, kw)
        return self.head(h)
