"""Typed configuration: the single source of truth for models, data, training and evaluation.

Every field carries its own documentation (``doc(...)``); the CLI's help, ``memext config`` and
the docs are generated from it, so a default or a description lives in exactly one place. A
setting of a variant (an attention kernel, a memory, a rotary rule) is declared by the variant:
its field here reads the default from the variant's registry (``variant_field``), and its checks
are the variant's own, which ``__post_init__`` runs through the registry. Validation raises
``ValueError`` naming the field, the bad value and what is accepted.

Around it: ``memext.fields`` (declaring, checking and parsing a field), ``memext.source`` (a
``data.mixture`` source), ``memext.presets`` (the named configs) and ``memext.config_docs`` (the
settings reference generated from the field docs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from memext.fields import check_choice as _check_choice
from memext.fields import check_positive as _check_positive
from memext.fields import (
    check_variants,
    doc,
    names_help,
    parse_setting,
    plain,
    read_mapping,
    read_sections,
    variant_field,
    write_mapping,
)
from memext.fields import fail as _fail
from memext.nn.attention import ATTENTION
from memext.nn.memory import MEMORY
from memext.nn.rope_scaling import ROPE_SCALING, check_rope_args
from memext.presets import PRESETS
from memext.registry import SettingError
from memext.source import Source, check_mixture

SCHEMA_VERSION = 1
FORMAT = "memext-config"


@dataclass(frozen=True)
class ModelConfig:
    """The architecture: a decoder-only Transformer (``LongLM``), an encoder-decoder or an LSTM."""

    vocab_size: int = doc(264, "Vocabulary size; 264 = 256 byte values + 8 reserved special ids.")
    d_model: int = doc(128, "Width of the residual stream.")
    n_layers: int = doc(4, "Number of Transformer blocks.")
    n_heads: int = doc(4, "Attention heads; d_model must be divisible by n_heads.")
    heads: tuple[int, ...] = doc(
        (),
        "Attention heads each layer keeps after head pruning (`memext compress prune`), one "
        "count per layer, each 1..n_heads; () = n_heads in every layer. head_dim stays "
        "d_model / n_heads.",
    )
    d_ff: int = doc(
        0, "Hidden width of the SwiGLU feed-forward; 0 = 8/3 * d_model rounded up to 64."
    )
    max_seq_len: int = doc(
        8192, "Longest sequence (prompt + cache) one forward pass accepts; longer input is refused."
    )
    attention: str = doc(
        "full", names_help(ATTENTION, "Attention kernel", "See docs/attention.md.")
    )
    window: int = variant_field(
        ATTENTION,
        "window",
        "keys a query may see. sliding, causal: i-W+1..i; bidirectional: W/2 on each side "
        "(Hugging Face Longformer's attention_window); block_sparse: the band of blocks covering "
        "them; chunked: the W-token chunk holding i.",
    )
    dilation: int = variant_field(
        ATTENTION, "dilation", "attend every dilation-th key inside the window."
    )
    global_tokens: int = variant_field(
        ATTENTION,
        "global_tokens",
        "the first g positions are global. Bidirectional: they see all and are seen by all. "
        "Causal: every later token sees them (like attention sinks). arch=seq2seq: the encoder "
        "prepends g learned tokens, which are those positions (no mask to pass).",
    )
    lsh_chunk: int = variant_field(
        ATTENTION, "lsh_chunk", "chunk length; each chunk attends to itself and the previous one."
    )
    lsh_buckets: int = variant_field(
        ATTENTION, "lsh_buckets", "hash buckets per round (even); 0 = 2 * seq_len / lsh_chunk."
    )
    lsh_rounds: int = variant_field(
        ATTENTION, "lsh_rounds", "hashing rounds, combined by log-sum-exp."
    )
    lsh_seed: int = variant_field(
        ATTENTION, "lsh_seed", "seed of the random rotations used in evaluation (fixed there)."
    )
    block_size: int = variant_field(ATTENTION, "block_size", "block length (BigBird's block_size).")
    random_blocks: int = variant_field(
        ATTENTION, "random_blocks", "random key blocks per query block."
    )
    reversible: bool = doc(
        False, "RevNet-coupled blocks: activations are recomputed in backward, not stored."
    )
    ff_chunk: int = doc(
        0, "Apply the feed-forward to this many tokens at a time (0 = all at once)."
    )
    memory: str = doc(
        "none",
        names_help(
            MEMORY,
            "Memory beyond the window",
            "Memory models read long input in segments (see docs/memory.md).",
        ),
    )
    mem_len: int = variant_field(
        MEMORY, "mem_len", "keys and values each layer keeps from earlier segments."
    )
    cmem_len: int = variant_field(MEMORY, "cmem_len", "compressed memory slots each layer keeps.")
    cmem_rate: int = variant_field(
        MEMORY, "cmem_rate", "evicted memories per compressed slot (rate c)."
    )
    compress: Literal["conv", "mean"] = variant_field(
        MEMORY, "compress", "learned strided convolution, or mean-pooling (no parameters)."
    )
    mem_tokens: int = variant_field(
        MEMORY, "mem_tokens", "memory tokens (RMT) read and written each segment."
    )
    knn_layer: int = variant_field(
        MEMORY, "knn_layer", "the layer that retrieves from the memory store (-1 = last)."
    )
    knn_topk: int = variant_field(MEMORY, "knn_topk", "memories retrieved per query.")
    knn_max: int = variant_field(
        MEMORY,
        "knn_max",
        "most keys the store keeps per row, oldest dropped first (0 = unbounded).",
    )
    knn_backend: Literal["torch", "faiss"] = variant_field(
        MEMORY,
        "knn_backend",
        "exact top-k in torch, or faiss-cpu (pip install faiss-cpu) for large stores.",
    )
    arch: Literal["transformer", "lstm", "seq2seq"] = doc(
        "transformer",
        "transformer (LongLM), lstm (the recurrent baseline: d_model, n_layers) or seq2seq (an "
        "encoder-decoder: `attention` is the encoder's kernel, bidirectional; the decoder's "
        "self- and cross-attention are dense). seq2seq trains on data.mixture tasks read as "
        "source (prompt) and target (answer).",
    )
    encoder_layers: int = doc(
        0, "arch=seq2seq: encoder blocks (0 = n_layers); the decoder has n_layers blocks."
    )
    max_target_len: int = doc(
        256,
        "arch=seq2seq: longest target the decoder reads (its start token included); "
        "max_seq_len bounds the source.",
    )
    rope_base: float = doc(10000.0, "Base of the rotary position embedding's frequencies.")
    rope_scaling: str = doc(
        "none",
        names_help(
            ROPE_SCALING,
            "Rotary scaling to read beyond the training length",
            "memext.nn.rope_scaling says what each rule does.",
        ),
    )
    rope_factor: float = doc(
        1.0, "Rotary scaling factor s: the extended length over rope_original_len (> 0)."
    )
    rope_original_len: int = doc(
        0,
        "The length the model was trained at (0 = not scaled); required when rope_scaling is "
        "not none, and at most max_seq_len.",
    )
    yarn_alpha: float = variant_field(
        ROPE_SCALING,
        "yarn_alpha",
        "pairs turning fewer than alpha times over rope_original_len are interpolated.",
    )
    yarn_beta: float = variant_field(
        ROPE_SCALING,
        "yarn_beta",
        "pairs turning more than beta times over rope_original_len are kept as is.",
    )
    tie_embeddings: bool = doc(True, "Share the input embedding and output projection weights.")
    norm_eps: float = doc(1e-5, "Epsilon of RMSNorm.")
    init_std: float = doc(0.02, "Std of the normal init; residual outputs get / sqrt(2 n_layers).")
    dropout: float = doc(0.0, "Dropout on attention and feed-forward outputs during training.")

    def __post_init__(self) -> None:
        _check_positive("model", self, "vocab_size", "d_model", "n_layers", "n_heads")
        _check_positive("model", self, "max_seq_len", "rope_base", "norm_eps", "init_std")
        if self.d_model % self.n_heads:
            _fail("model", "d_model", self.d_model, f"a multiple of n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            _fail("model", "n_heads", self.n_heads, "a value giving an even head_dim (rotary)")
        if self.d_ff < 0:
            _fail("model", "d_ff", self.d_ff, "0 (auto) or a positive width")
        if not 0.0 <= self.dropout < 1.0:
            _fail("model", "dropout", self.dropout, "a probability in [0, 1)")
        if self.ff_chunk < 0:
            _fail("model", "ff_chunk", self.ff_chunk, "a number >= 0")
        check_variants(
            "model", self, {"attention": ATTENTION, "memory": MEMORY, "rope_scaling": ROPE_SCALING}
        )
        self._check_rope()
        if self.memory != "none" and self.reversible:
            _fail("model", "memory", self.memory, "'none' with reversible=true")
        if self.arch == "lstm" and self.memory != "none":
            _fail(
                "model", "memory", self.memory, "'none' for arch='lstm' (its state is its memory)"
            )
        _check_choice("model", self, "arch")
        self._check_seq2seq()
        self._check_heads()

    def _check_heads(self) -> None:
        if not self.heads:
            return
        if len(self.heads) != self.n_layers or not all(1 <= h <= self.n_heads for h in self.heads):
            _fail(
                "model",
                "heads",
                list(self.heads),
                f"{self.n_layers} counts (one per layer), each in 1..n_heads={self.n_heads}",
            )
        if self.arch != "transformer":
            _fail("model", "arch", self.arch, "'transformer' with pruned heads (model.heads)")
        if not MEMORY[self.memory].prunable:
            able = ", ".join(n for n in MEMORY if MEMORY[n].prunable)
            _fail(
                "model",
                "memory",
                self.memory,
                f"one whose state is not shaped by n_heads with pruned heads: {able}",
            )

    def layer_heads(self) -> tuple[int, ...]:
        """The attention heads of each layer: ``heads``, or n_heads in every layer."""
        return self.heads or (self.n_heads,) * self.n_layers

    def _check_seq2seq(self) -> None:
        if self.encoder_layers < 0:
            _fail("model", "encoder_layers", self.encoder_layers, "0 (= n_layers) or > 0")
        _check_positive("model", self, "max_target_len")
        if self.arch != "seq2seq":
            return
        if self.max_target_len < 2:
            _fail("model", "max_target_len", self.max_target_len, ">= 2 (a start token and one)")
        if self.memory != "none":
            _fail("model", "memory", self.memory, "'none' for arch='seq2seq'")
        if self.reversible:
            _fail("model", "reversible", self.reversible, "false for arch='seq2seq'")
        if not ATTENTION[self.attention].bidirectional:
            able = ", ".join(n for n in ATTENTION if ATTENTION[n].bidirectional)
            _fail(
                "model",
                "attention",
                self.attention,
                f"a kernel that attends bidirectionally for the seq2seq encoder: {able}",
            )

    def _check_rope(self) -> None:
        try:
            check_rope_args(self.rope_scaling, None, self.rope_factor, self.rope_original_len)
        except SettingError as e:
            _fail("model", e.setting, e.value, e.accepted)
        if self.rope_original_len > self.max_seq_len:
            _fail(
                "model",
                "rope_original_len",
                self.rope_original_len,
                f"<= max_seq_len={self.max_seq_len}: the original (training) length must not "
                "exceed the new one",
            )
        if self.rope_scaling == "none":
            return
        if self.arch == "lstm":
            _fail("model", "rope_scaling", self.rope_scaling, "'none' for arch='lstm' (no rotary)")
        least = ROPE_SCALING[self.rope_scaling].min_head_dim
        if self.head_dim < least:
            _fail(
                "model", "n_heads", self.n_heads, f"a head_dim >= {least} for {self.rope_scaling}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.d_ff:
            return self.d_ff
        return -(-(8 * self.d_model // 3) // 64) * 64


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    corpus: str = doc(
        "stdlib",
        "Text source: 'stdlib' (the running Python's standard-library sources), a file, a "
        "directory, a glob, or a .gz file.",
    )
    tokenizer: str = doc(
        "byte",
        "'byte' (lossless byte-level) or the path of a tokenizer.json from `memext tokenizer train`.",
    )
    val_percent: float = doc(
        5.0,
        "Share of files held out for validation (chosen by a hash of each file's path); a "
        "single-file corpus holds out its last val_percent of bytes instead.",
    )
    raw_bytes: bool = doc(
        False, "Read files that are not valid UTF-8 as raw bytes instead of skipping them."
    )
    mixture: tuple[Source, ...] = doc(
        (),
        "What each training step reads: a list of sources (see Source: task, share, batch_size, "
        "lengths, stages, near, filler, answer_weight); () = the corpus alone. On the command "
        "line, YAML: --set 'data.mixture=[{task: lm}, {task: passkey, lengths: [512]}]'.",
    )

    def __post_init__(self) -> None:
        if not self.corpus:
            _fail("data", "corpus", self.corpus, "'stdlib' or a path")
        if not 0.0 < self.val_percent < 100.0:
            _fail("data", "val_percent", self.val_percent, "a percentage in (0, 100)")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation: AdamW with warmup + cosine decay."""

    seq_len: int = doc(256, "Tokens per training sequence.")
    segment_len: int = doc(
        0,
        "Feed each sequence in segments of this many tokens, carrying the model's state (memory) "
        "from one to the next; 0 = the whole sequence at once. Must divide seq_len.",
    )
    bptt: int = doc(
        1,
        "Segments per truncated-backprop window: gradients flow through the carried state for "
        "this many segments (1 = stop-gradient between segments; 0 = through the whole sequence).",
    )
    curriculum: tuple[int, ...] = doc(
        (),
        "Progressive context lengths trained after the first stage (seq_len for `steps` steps), "
        "e.g. 1024,2048. Each stage keeps the tokens per step (batch_size * seq_len), and with "
        "model.rope_scaling its rotary factor is its length / model.rope_original_len.",
    )
    curriculum_steps: tuple[int, ...] = doc(
        (), "Optimizer steps of each curriculum stage, one per curriculum length."
    )
    batch_size: int = doc(
        16,
        "Sequences per micro-batch, over all ranks: under torchrun each of W data-parallel ranks "
        "reads batch_size / W of them, so a run is the same at any world size "
        "(docs/distributed.md).",
    )
    grad_accum: int = doc(1, "Micro-batches accumulated per optimizer step.")
    steps: int = doc(600, "Optimizer steps.")
    lr: float = doc(3e-3, "Peak learning rate.")
    min_lr_ratio: float = doc(0.1, "Final learning rate as a fraction of lr.")
    warmup_steps: int = doc(30, "Linear warmup steps.")
    weight_decay: float = doc(0.1, "AdamW weight decay (matrices only; not norms or embeddings).")
    beta1: float = doc(0.9, "AdamW beta1.")
    beta2: float = doc(0.95, "AdamW beta2.")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this; 0 disables.")
    seed: int = doc(0, "Seed of the initialisation and of the batch order.")
    precision: Literal["auto", "fp32", "bf16"] = doc(
        "auto", "'auto' = bf16 autocast on GPU, fp32 on CPU."
    )
    compile: bool = doc(False, "torch.compile the model.")
    activation_checkpointing: bool = doc(False, "Recompute each block's activations in backward.")
    strategy: Literal["ddp", "fsdp"] = doc(
        "ddp",
        "Data parallelism under torchrun (docs/distributed.md). ddp: every rank holds the whole "
        "model; checkpoints are one model.safetensors. fsdp: FSDP2 shards parameters, gradients "
        "and optimizer state over the ranks (bf16 parameters on CUDA when precision asks for "
        "bf16); checkpoints are sharded (model.dcp/), readable at any world size.",
    )
    context_parallel: int = doc(
        1,
        "Ranks that split each training sequence between them (context parallelism, "
        "docs/context_parallel.md): under torchrun the W ranks form W/N data-parallel replicas "
        "of N ranks each; every training length must divide into 2N chunks (zig-zag). Needs "
        "model.memory='none', arch='transformer' and strategy='ddp'; 1 = off.",
    )
    cp_method: Literal["ring", "ulysses"] = doc(
        "ring",
        "How attention spans the context-parallel ranks. ring: K and V pass round the ranks "
        "(attention full, or sliding without dilation or global tokens). ulysses: an all-to-all "
        "gives each rank whole sequences of n_heads/N heads (any kernel; n_heads divisible by N).",
    )
    dist_timeout: float = doc(
        1800.0,
        "Seconds a rank waits for the others in a collective before the job stops (a hung "
        "rank); torchrun jobs only.",
    )
    eval_every: int = doc(
        200,
        "Run the training probes (validation bits-per-byte, eval.probes) every this many steps "
        "and at the end; 0 = only at the end.",
    )
    eval_tokens: int = doc(16384, "Validation tokens scored at each periodic validation.")
    save_every: int = doc(200, "Checkpoint every this many steps (and at the end).")
    log_every: int = doc(10, "Append a line to metrics.jsonl every this many steps.")
    distill_teacher: str = doc(
        "",
        "Distil from this teacher (any model memext opens: a run, a Hugging Face dir, a known "
        "name) on the same batches: its logits are computed on the fly and mixed with the "
        "tokens' cross-entropy (docs/compression.md); '' = plain training. The teacher must use "
        "the student's tokenizer and read each training sequence whole.",
    )
    distill_alpha: float = doc(
        0.5,
        "Weight of the teacher's soft targets: loss = alpha * T^2 * KL(teacher_T ‖ student_T) "
        "+ (1 - alpha) * CE, in [0, 1].",
    )
    distill_temperature: float = doc(
        2.0, "Temperature T of the distillation's softmaxes (> 0; 1 = the models' own)."
    )
    distill_init: bool = doc(
        False,
        "Start the student from the teacher's weights, as DistilBERT does: its embedding, final "
        "norm, head and each block copied from evenly spaced teacher blocks (first and last "
        "kept); parameters the teacher lacks (a memory's) keep their initialisation. Needs a "
        "memext-run teacher of the same width.",
    )

    def __post_init__(self) -> None:
        _check_positive("train", self, "seq_len", "batch_size", "grad_accum", "steps", "lr")
        _check_positive("train", self, "save_every", "log_every", "eval_tokens", "dist_timeout")
        for name in ("segment_len", "bptt"):
            if getattr(self, name) < 0:
                _fail("train", name, getattr(self, name), "a number >= 0")
        if self.segment_len and self.seq_len % self.segment_len:
            _fail("train", "segment_len", self.segment_len, f"a divisor of seq_len={self.seq_len}")
        for name in ("warmup_steps", "eval_every", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                _fail("train", name, getattr(self, name), "a number >= 0")
        for name in ("beta1", "beta2", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                _fail("train", name, getattr(self, name), "a number in [0, 1]")
        if not 0.0 <= self.distill_alpha <= 1.0:
            _fail("train", "distill_alpha", self.distill_alpha, "a weight in [0, 1]")
        if not 0.0 < self.distill_temperature < float("inf"):
            _fail("train", "distill_temperature", self.distill_temperature, "a number > 0")
        _check_choice("train", self, "precision")
        _check_choice("train", self, "strategy")
        _check_choice("train", self, "cp_method")
        self._check_context_parallel()
        if len(self.curriculum_steps) != len(self.curriculum):
            _fail(
                "train",
                "curriculum_steps",
                self.curriculum_steps,
                f"one step count per curriculum length ({len(self.curriculum)})",
            )
        previous = self.seq_len
        for n in self.curriculum:
            # Equal lengths are allowed: a stage may change only the mixture (data.mixture).
            if not isinstance(n, int) or n < previous:
                _fail("train", "curriculum", self.curriculum, "lengths not decreasing from seq_len")
            if self.segment_len and n % self.segment_len:
                _fail("train", "curriculum", self.curriculum, "multiples of segment_len")
            previous = n
        if any(not isinstance(n, int) or n < 1 for n in self.curriculum_steps):
            _fail("train", "curriculum_steps", self.curriculum_steps, "step counts >= 1")

    def _check_context_parallel(self) -> None:
        """Every training length divides into the 2N zig-zag chunks of context parallelism."""
        n = self.context_parallel
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            _fail("train", "context_parallel", n, "a number of ranks >= 1 (1 = off)")
        if n == 1:
            return
        if self.strategy != "ddp":
            _fail(
                "train",
                "strategy",
                self.strategy,
                f"'ddp' with context_parallel={n} (FSDP is not composed with it yet)",
            )
        for name, length in (
            ("seq_len", self.seq_len),
            *(("curriculum", c) for c in self.curriculum),
        ):
            if length % (2 * n):
                _fail(
                    "train",
                    name,
                    length if name == "seq_len" else self.curriculum,
                    cp_lengths(n, length),
                )

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: the first stage and every curriculum stage."""
        return self.steps + sum(self.curriculum_steps)


@dataclass(frozen=True)
class EvalConfig:
    """Bits-per-byte against context length (see docs/evaluation.md for the definition)."""

    lengths: tuple[int, ...] = doc(
        (128, 256, 512, 1024), "Context lengths L; each is read in windows of L, stride L/2."
    )
    max_tokens: int = doc(16384, "Scored tokens per length: the same positions at every length.")
    batch_size: int = doc(8, "Windows per forward pass.")
    reach: tuple[int, ...] = doc(
        (1, 4, 16),
        "Memory reach: how many training segments of earlier text precede each scored segment, "
        "read with the memory carried vs in one pass (models trained with train.segment_len).",
    )
    probes: tuple[str, ...] = doc(
        (),
        "Held-out task probes during training, each TASK@LENGTH (e.g. passkey@512): every "
        "train.eval_every steps and at the end, the exact match on probe_samples samples of TASK "
        "of LENGTH input tokens (keys at evenly spread depths), cut from the validation text and "
        "seeded apart from the training samples; logged as probe/TASK@LENGTH. `memext train` "
        "runs them.",
    )
    probe_samples: int = doc(16, "Samples per held-out task probe (eval.probes).")

    def __post_init__(self) -> None:
        if any(not isinstance(n, int) or n < 1 for n in self.reach):
            _fail("eval", "reach", self.reach, "a list of integers >= 1 (may be empty)")
        if not self.lengths or any(not isinstance(n, int) or n < 2 or n % 2 for n in self.lengths):
            _fail("eval", "lengths", self.lengths, "a non-empty list of even integers >= 2")
        _check_positive("eval", self, "max_tokens", "batch_size", "probe_samples")
        for spec in self.probes:
            task, sep, length = spec.partition("@")
            if not (task and sep and length.isdecimal() and int(length) >= 2):
                _fail(
                    "eval",
                    "probes",
                    self.probes,
                    "TASK@LENGTH entries (LENGTH >= 2), e.g. passkey@512",
                )

    @property
    def probe_cells(self) -> tuple[tuple[str, int], ...]:
        """``eval.probes`` as (task, length) pairs."""
        return tuple((task, int(n)) for task, _, n in (p.partition("@") for p in self.probes))


@dataclass(frozen=True)
class Config:
    """A whole run: model, data, training and evaluation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        segment = self.train.segment_len or self.train.seq_len
        if segment > self.model.max_seq_len:
            _fail(
                "train",
                "segment_len" if self.train.segment_len else "seq_len",
                segment,
                f"<= model.max_seq_len={self.model.max_seq_len}",
            )
        if self.train.segment_len and self.model.memory == "none" and self.model.arch != "lstm":
            _fail(
                "train",
                "segment_len",
                self.train.segment_len,
                "0 when model.memory='none' (segments would not see each other)",
            )
        if self.train.curriculum and self.train.curriculum[-1] > self.model.max_seq_len:
            _fail(
                "train",
                "curriculum",
                self.train.curriculum,
                f"lengths <= model.max_seq_len={self.model.max_seq_len}",
            )
        if self.model.arch == "seq2seq":
            lm = [i for i, s in enumerate(self.data.mixture) if s.task == "lm"]
            if not self.data.mixture or lm:
                _fail(
                    "data",
                    "mixture",
                    plain(self.data.mixture),
                    "synthetic tasks only for model.arch='seq2seq' (it reads source/target "
                    "pairs, not running text), e.g. [{task: digest}]",
                )
        check_mixture(
            self.data.mixture,
            segment_len=self.train.segment_len,
            n_stages=1 + len(self.train.curriculum),
            max_seq_len=self.model.max_seq_len,
        )
        self._check_context_parallel()
        self._check_distill()
        too_long = [n for _, n in self.eval.probe_cells if n > self.model.max_seq_len]
        if too_long and not self.train.segment_len:
            _fail(
                "eval",
                "probes",
                self.eval.probes,
                f"lengths <= model.max_seq_len={self.model.max_seq_len} (a model that reads in "
                "segments may probe longer)",
            )
        too_long = [n for n in self.eval.lengths if n > self.model.max_seq_len]
        if too_long:
            _fail(
                "eval",
                "lengths",
                self.eval.lengths,
                f"lengths <= model.max_seq_len={self.model.max_seq_len}",
            )

    def _check_distill(self) -> None:
        """Distillation compares a decoder's predictions with the teacher's, each sequence
        whole on one rank."""
        if not self.train.distill_teacher:
            if self.train.distill_init:
                _fail("train", "distill_init", True, "false without train.distill_teacher")
            return
        if self.model.arch == "seq2seq":
            _fail("model", "arch", self.model.arch, "a decoder with train.distill_teacher set")
        if self.train.context_parallel != 1:
            _fail(
                "train",
                "context_parallel",
                self.train.context_parallel,
                "1 with train.distill_teacher set (the teacher reads each sequence whole)",
            )

    def _check_context_parallel(self) -> None:
        """What context parallelism splits: one whole sequence per forward, through a kernel
        the ring or Ulysses runs (``TrainConfig`` checks its own lengths)."""
        m, t = self.model, self.train
        n = t.context_parallel
        if n == 1:
            return
        why = f"with train.context_parallel={n}"
        if m.arch != "transformer":
            _fail("model", "arch", m.arch, f"'transformer' {why}")
        if m.heads:
            _fail("model", "heads", list(m.heads), f"() (no pruned heads) {why}")
        if m.memory != "none":
            _fail(
                "model",
                "memory",
                m.memory,
                f"'none' {why}: memories carry state from one segment to the next, and "
                "context parallelism reads each sequence whole, split across ranks",
            )
        for i, src in enumerate(self.data.mixture):
            odd = [length for length in src.lengths if length % (2 * n)]
            if odd:
                _fail("data", f"mixture[{i}].lengths", list(src.lengths), cp_lengths(n, odd[0]))
        ring = "'full', or 'sliding' without dilation or global tokens, for train.cp_method='ring'"
        if t.cp_method == "ring" and m.attention not in ("full", "sliding"):
            _fail(
                "model",
                "attention",
                m.attention,
                f"{ring} (train.cp_method='ulysses' runs the other kernels but lsh)",
            )
        if t.cp_method == "ring" and m.attention == "sliding":
            for name, plain_value in (("dilation", 1), ("global_tokens", 0)):
                if getattr(m, name) != plain_value:
                    _fail(
                        "model",
                        name,
                        getattr(m, name),
                        f"{plain_value}: the ring runs {ring} (train.cp_method='ulysses' runs "
                        "any sliding window)",
                    )
        if t.cp_method == "ulysses" and m.attention == "lsh":
            _fail(
                "model",
                "attention",
                m.attention,
                "a kernel other than lsh for train.cp_method='ulysses': lsh draws new hash "
                "rotations at every call in training, and Ulysses recomputes the attention in "
                "backward",
            )
        if t.cp_method == "ulysses" and m.n_heads % n:
            _fail(
                "model",
                "n_heads",
                m.n_heads,
                f"a multiple of train.context_parallel={n} for train.cp_method='ulysses' (each "
                "rank attends n_heads/N heads), or train.cp_method='ring'",
            )

    # --- construction -------------------------------------------------------------------------
    @staticmethod
    def preset(name: str) -> Config:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}")
        return from_dict(PRESETS[name])

    def replace(self, **changes: Any) -> Config:
        """``cfg.replace(**{"model.n_layers": 2})`` or ``cfg.replace(model=ModelConfig(...))``."""
        flat = {k: v for k, v in changes.items() if "." in k}
        cfg = dataclasses.replace(self, **{k: v for k, v in changes.items() if "." not in k})
        return cfg.override(flat) if flat else cfg

    def override(self, assignments: dict[str, Any]) -> Config:
        """Apply dotted overrides (``{"model.n_layers": "4"}``); strings are parsed by field type."""
        data = to_dict(self)
        for key, raw in assignments.items():
            section, name, value = parse_setting(SECTIONS, key, raw)
            data[section][name] = value
        return from_dict(data)

    # --- files --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the config as YAML (``.yaml``/``.yml``) or JSON, atomically."""
        write_mapping(path, {"format": FORMAT, "schema_version": SCHEMA_VERSION, **to_dict(self)})

    @staticmethod
    def load(path: str | Path) -> Config:
        return from_dict(read_mapping(path), source=str(path))


def cp_lengths(n: int, length: int) -> str:
    """What a training length must be under ``train.context_parallel=n``: the accepted values
    nearest ``length``, for the error message."""
    k = 2 * n
    below, above = length // k * k, (length // k + 1) * k
    near = f"{below} or {above}" if below else str(above)
    return (
        f"a multiple of {k} with train.context_parallel={n} (each sequence is cut into 2 x {n} "
        f"equal chunks, zig-zag), e.g. {near}"
    )


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return {name: plain(getattr(cfg, name)) for name in SECTIONS}


def from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Build a Config from a (possibly partial) mapping; missing fields take their defaults."""
    data = dict(data)
    fmt = data.pop("format", FORMAT)
    version = data.pop("schema_version", SCHEMA_VERSION)
    if fmt != FORMAT:
        raise ValueError(f"{source} is not a memext config (format={fmt!r})")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{source} has schema_version={version!r}; this memext reads version {SCHEMA_VERSION}"
        )
    return Config(**read_sections(SECTIONS, data, source))
