"""llama.cpp's `llama-server` for tests, with a tiny random-weight model the tests write.

`write_tiny_gguf(path)` writes a llama-architecture GGUF with PyPI's `gguf` package: two
layers of width 64, a SentencePiece vocabulary with byte fallback (so any text tokenizes)
and a ChatML chat template. It has no knowledge, but it is a real model to llama.cpp: the
server loads it in well under a second, tokenizes, applies the template, samples and streams
like it would for any other, and its context size, slots and errors are the real ones.

The output layer is built so that the model only ever says printable ASCII: the rows of
the control and byte tokens are zero, every other row is random and large, so those tokens
always outrank them (greedy or sampled with llama-server's default min-p). It never says
end-of-sequence either, so every answer runs to `max_tokens` or to the end of the context,
which is what the truncation tests need.

`llama_server(model, ...)` runs the binary that scripts/setup-llama installed on a free
loopback port and waits until it has loaded the model.
"""

from __future__ import annotations

import contextlib
import json
import string
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tests import servers

#: The name the server reports for the tiny model (its `--alias`).
MODEL_NAME = "chatq-tiny-llama"

#: A ChatML template; llama-server applies it with --jinja.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

N_EMBD = 64
N_HEAD = 4
N_LAYER = 2
N_FF = 128
N_CTX_TRAIN = 4096


def _vocabulary() -> tuple[list[str], list[float], list[int]]:
    """SentencePiece tokens, scores and types: control, 256 byte tokens, then ASCII text."""
    import gguf

    types = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    kinds = [types.UNKNOWN, types.CONTROL, types.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    kinds += [types.BYTE] * 256
    # "▁" is SentencePiece's space; the rest are single printable characters.
    text = ["\u2581"] + [c for c in string.ascii_letters + string.digits + string.punctuation]
    tokens += text
    kinds += [types.NORMAL] * len(text)
    scores = [0.0] * len(tokens)
    return tokens, scores, [int(k) for k in kinds]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """Write the tiny model to `path` (about 1 MB, milliseconds) and return the path."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens, scores, kinds = _vocabulary()
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEAD

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(MODEL_NAME)
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def weight(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    ones = np.ones(N_EMBD, dtype=np.float32)
    writer.add_tensor("token_embd.weight", weight(n_vocab, N_EMBD, scale=1.0))
    for i in range(N_LAYER):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", ones.copy())
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{blk}.{name}.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_norm.weight", ones.copy())
        writer.add_tensor(f"{blk}.ffn_gate.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_up.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_down.weight", weight(N_EMBD, N_FF))
    writer.add_tensor("output_norm.weight", ones.copy())
    # Logits of the control and byte tokens stay 0; the text tokens' spread far around it
    # (standard deviation 8 for a unit-RMS hidden state), so the top ones are always text.
    output = weight(n_vocab, N_EMBD, scale=1.0)
    first_text = 3 + 256
    output[:first_text] = 0.0
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def server_binary() -> Path:
    """Where scripts/setup-llama put llama-server; skip (fail in CI) when it did not."""
    marker = servers.REPO / ".venv" / ".llama-server"
    if not marker.exists():
        servers.unavailable("llama.cpp's llama-server is not set up: run scripts/setup-llama")
    path = Path(marker.read_text().strip())
    if not path.exists():
        servers.unavailable(f"{path} is gone: run scripts/setup-llama again")
    return path


def server_args(model: Path, port: int, ctx: int, slots: int, unified: bool) -> list[str]:
    """llama-server's command line for the tiny model."""
    args = [str(server_binary()), "--model", str(model), "--alias", MODEL_NAME,
            "--host", "127.0.0.1", "--port", str(port), "--parallel", str(slots),
            "--threads", "1", "--jinja", "--no-webui"]
    # Unified: the slots share one cache of `ctx` tokens (llama.cpp's default when it picks
    # the slot count itself); else each slot has `ctx` of its own.
    if unified:
        return [*args, "--ctx-size", str(ctx), "--kv-unified"]
    return [*args, "--ctx-size", str(ctx * slots)]


@contextlib.contextmanager
def llama_server(model: Path, ctx: int = 512, slots: int = 2, unified: bool = False,
                 port: int | None = None, tmp: Path | None = None) -> Iterator[servers.Server]:
    """A llama-server with `slots` parallel slots and `ctx` tokens of context, on a free port.

    `server.url` is its OpenAI base URL (ending in /v1). Pass the `port` of an earlier one
    to start it again where clients expect it (the restart tests).
    """
    port = port or servers.free_port()
    logdir = Path(tmp or tempfile.mkdtemp(prefix="chatq-llama-"))
    log = logdir / f"llama-server-{port}.log"
    proc = servers._popen(server_args(model, port, ctx, slots, unified), log)
    server = servers.Server(f"http://127.0.0.1:{port}/v1", port, proc, log,
                            {"root": f"http://127.0.0.1:{port}"})
    try:
        # /health answers 503 while the model loads, 200 once it can serve.
        servers.wait_for(lambda: servers.http_ok(f"http://127.0.0.1:{port}/health"),
                         f"llama-server on port {port} to load {model.name}", 60, proc, log)
        yield server
    finally:
        server.stop()


def props(server: servers.Server) -> dict[str, object]:
    """The server's /props (its slots, context size and chat template)."""
    with urllib.request.urlopen(f"{server.extra['root']}/props", timeout=5) as resp:
        data: dict[str, object] = json.load(resp)
        return data
