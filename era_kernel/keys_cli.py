"""``era keys create|list|revoke``: tenants' API keys, in the metadata store the server
uses (``ERA_STORE_URL``, else the data directory's SQLite). A running server sees a new
or revoked key within a second (tenants.CACHE_SECONDS); no restart."""

from __future__ import annotations

import sys
from typing import Any


def _run(action) -> int:
    import asyncio

    from .config import Settings
    from .errors import EraError
    from .store.base import store_for_url
    from .tenants import Keys

    async def main() -> int:
        store = store_for_url(Settings.from_env()["ERA_STORE_URL"])
        await store.open()
        try:
            return await action(Keys(store))
        except EraError as exc:
            field = f" ({exc.field})" if exc.field else ""
            print(f"era: {exc.message}{field}", file=sys.stderr)
            return 2
        finally:
            await store.close()

    return asyncio.run(main())


def _limits_text(limits: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(limits.items())) or "-"


def _cmd_create(args) -> int:
    from .tenants import LIMITS

    limits = {name: getattr(args, name) for name in LIMITS}

    async def create(keys) -> int:
        record, key = await keys.create(args.name, limits, admin=args.admin)
        print(key)  # stdout carries the key alone, for scripts: it is never shown again
        print(f"created key '{record['name']}' (id {record['id']}{', admin' if record['admin'] else ''}; limits "
              f"{_limits_text(record['limits'])}): store it now, it is not shown again", file=sys.stderr)
        return 0

    return _run(create)


def _cmd_list(args) -> int:
    async def show(keys) -> int:
        records = await keys.list()
        if args.json:
            import json

            print(json.dumps(records, indent=2))
            return 0
        print(f"{'NAME':<24} {'ID':<12} {'CREATED':<24} {'ADMIN':<5} {'LIMITS':<40} REVOKED")
        for r in records:
            print(f"{r['name']:<24} {r['id']:<12} {r['created_at']:<24} {'yes' if r.get('admin') else 'no':<5} "
                  f"{_limits_text(r.get('limits') or {}):<40} {r.get('revoked_at') or '-'}")
        return 0

    return _run(show)


def _cmd_revoke(args) -> int:
    async def revoke(keys) -> int:
        record = await keys.revoke(args.key)
        print(f"revoked key '{record['name']}' (id {record['id']}) at {record['revoked_at']}")
        return 0

    return _run(revoke)


def _count(text: str) -> int:
    import argparse

    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (0 or more)")
    return int(text)


def add_keys_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="manage tenants' API keys (each sees only its own sessions)")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    create = keys_sub.add_parser("create", help="make a key; it is printed once, on stdout")
    create.add_argument("--name", required=True, help="1-64 of letters, digits, '_', '.', '-'")
    create.add_argument("--sessions", type=_count, default=None, help="most sessions at once")
    create.add_argument("--kernels", type=_count, default=None, help="most live kernels at once")
    create.add_argument("--storage-bytes", dest="storage_bytes", type=_count, default=None,
                        help="most bytes kept in the storage proxy (KV, objects, SQL databases)")
    create.add_argument("--runs-per-minute", dest="runs_per_minute", type=_count, default=None,
                        help="most runs started in any minute")
    create.add_argument("--admin", action="store_true", help="sees and manages every tenant's sessions")
    create.set_defaults(func=_cmd_create)
    listing = keys_sub.add_parser("list", help="every key: name, id, created, limits, revoked (never the key)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_cmd_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by name or id (a server refuses it within a second)")
    revoke.add_argument("key", metavar="NAME|ID")
    revoke.set_defaults(func=_cmd_revoke)
