"""``blobd token create|list|revoke``."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt

from .. import auth
from ..errors import BlobdError
from .common import add_config_option, config_from_args, open_index


def register(sub: argparse._SubParsersAction) -> None:
    token = sub.add_parser("token", help="manage access tokens",
                           description="Create, list and revoke bearer tokens.")
    actions = token.add_subparsers(dest="action", metavar="ACTION", required=True)

    create = actions.add_parser("create", help="create a token and print it",
                                description="Create a token; it is printed once, "
                                "alone on the last line of standard output.")
    add_config_option(create)
    create.add_argument("--owner", required=True, help="the owner the token acts for")
    create.add_argument("--scopes", default="read,write",
                        help="comma-separated: read, write, admin (default: read,write)")
    create.add_argument("--label", default="", help="a note to recognise the token by")
    create.set_defaults(run=create_token)

    listing = actions.add_parser("list", help="list tokens (never their secrets)")
    add_config_option(listing)
    listing.add_argument("--owner", help="only this owner's tokens")
    listing.set_defaults(run=list_tokens)

    revoke = actions.add_parser("revoke", help="revoke a token by its id")
    add_config_option(revoke)
    revoke.add_argument("id", help="the token id shown by 'blobd token list'")
    revoke.set_defaults(run=revoke_token)


async def create_token(args: argparse.Namespace) -> int:
    scopes = auth.parse_scopes(args.scopes)
    # An existing store only, as every command but serve: a token made in
    # a new, empty store (a wrong directory, a typo in data_dir) would
    # only ever be refused by the server.
    async with open_index(config_from_args(args), must_exist=True) as store:
        async with store.write() as tx:
            token_id, token = await auth.create_token(tx.conn, args.owner, scopes, args.label)
    print(f"created token {token_id} for {args.owner} with scopes {','.join(sorted(scopes))}")
    print(token)
    return 0


async def list_tokens(args: argparse.Namespace) -> int:
    async with open_index(config_from_args(args), must_exist=True, write=False) as store:
        rows = await auth.list_tokens(store.db.reader, args.owner)
    print(f"{'ID':10} {'OWNER':20} {'SCOPES':18} {'CREATED':20} LABEL")
    for row in rows:
        created = dt.datetime.fromtimestamp(row["created_at"], dt.timezone.utc)
        print(f"{row['id']:10} {row['owner']:20} {row['scopes']:18} "
              f"{created:%Y-%m-%d %H:%M:%S}  {row['label']}")
    return 0


async def revoke_token(args: argparse.Namespace) -> int:
    async with open_index(config_from_args(args), must_exist=True) as store:
        async with store.write() as tx:
            found = await auth.revoke_token(tx.conn, args.id)
    if not found:
        raise BlobdError("not_found", f"no token with id {args.id}")
    # A running server may have the token in its cache: once this command
    # returns, every server refuses it.
    await asyncio.sleep(auth.TOKEN_CACHE_SECONDS)
    print(f"revoked token {args.id}")
    return 0
