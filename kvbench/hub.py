"""Can the Hugging Face hub be reached? Asked once, before any run starts, in milliseconds.

Without it, a machine with no network (and no `HF_HUB_OFFLINE`) spends 29–50 s in the hub client's retries
before a task or a model says what to do. `unreachable()` answers from the offline variables or one TCP
connect to the hub's endpoint (or the HTTPS proxy that would carry the request); `go_offline()` then puts the
hub client in offline mode, so what is in the local cache loads at once instead of after the retries.

Tests simulate a machine without network with `HF_ENDPOINT=http://127.0.0.1:<closed port>` (a refused
connect) or with `HF_HUB_OFFLINE=1`; nothing here has a test-only switch.
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}
_ANSWER: dict[str, str | None] = {}


def offline_var() -> str | None:
    """The offline variable that is set (HF_HUB_OFFLINE=1 ...), or None."""
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return var
    return None


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def _target(url: str) -> tuple[str, int]:
    """(host, port) a request to `url` connects to: the proxy when one applies, else the server."""
    u = urlparse(url)
    host, port = u.hostname or "huggingface.co", u.port or (443 if u.scheme == "https" else 80)
    no_proxy = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    bypass = any(h.strip() and (h.strip() == "*" or host.endswith(h.strip().lstrip(".")))
                 for h in no_proxy.split(","))
    names = ("HTTPS_PROXY", "https_proxy") if u.scheme == "https" else ("HTTP_PROXY", "http_proxy")
    proxy = next((os.environ[n] for n in names + ("ALL_PROXY", "all_proxy") if os.environ.get(n)), None)
    if proxy and not bypass:
        p = urlparse(proxy if "://" in proxy else "http://" + proxy)
        if p.hostname:
            return p.hostname, p.port or 80
    return host, port


def unreachable(timeout: float = 3.0) -> str | None:
    """None when the hub can be reached; otherwise why not, in a few words. Cached per process."""
    var = offline_var()
    if var:
        return f"{var} is set"
    url = endpoint()
    if url not in _ANSWER:
        host, port = _target(url)
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _ANSWER[url] = None
        except OSError as e:
            why = "name not resolved" if isinstance(e, socket.gaierror) else (
                "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower())
            _ANSWER[url] = f"no network: {host}:{port} cannot be reached ({why})"
    return _ANSWER[url]


def go_offline() -> None:
    """Offline mode for the hub client from now on, in this process and the jobs it starts: what is in the
    local cache loads without trying the network first."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import sys
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def cached_file(repo_id: str, filename: str, repo_type: str = "model") -> str | None:
    """The path of `filename` of a hub repo in the local cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
        p = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
    except Exception:
        return None
    return p if isinstance(p, str) and os.path.exists(p) else None
