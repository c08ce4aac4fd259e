"""W&B's server as create, launch, report and best use it: one check up front (the mode, the
credentials, no prompt), an answer within seconds when the server cannot be reached, and whatever
W&B refuses (no or a bad key, no network, no such sweep, no access) as one line: a UsageError, exit 2.
"""

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from agent.errors import UsageError, describe_validation_error, first_line

if TYPE_CHECKING:  # imported where used: wandb takes seconds to import
    import wandb

LOGIN = "run `wandb login`, or set WANDB_API_KEY"
RELOGIN = "check WANDB_API_KEY, or run `wandb login --relogin`"
# wandb-core retries a GraphQL request for minutes: right for a run uploading in the background, not for
# a command the user waits on. 3 attempts, 1-2 s apart, 10 s each: a refused connection or an unknown
# host is reported in about 4 s, a host that never answers in about 40 s. Only where the user has set
# nothing (WANDB_HTTP_TIMEOUT, WANDB__GRAPHQL_RETRY_MAX, ...): theirs wins.
PATIENCE = {"x_graphql_retry_max": 2, "x_graphql_retry_wait_max_seconds": 2.0, "x_graphql_timeout_seconds": 10.0}
OFFLINE_MODES = ("offline", "dryrun", "disabled")
REFUSED = (401, 403)  # the server's answer to a key it does not accept


@contextlib.contextmanager
def wandb_errors(what: str) -> Iterator[None]:
    """W&B's refusals inside the block (no such sweep, run or artifact, no access, the network gone) as
    one line, `what: W&B's reason`."""
    from wandb.errors import Error
    from wandb.sdk.lib.service.service_connection import WandbApiFailedError

    try:
        yield
    # WandbApiFailedError: a GraphQL request that failed is not a wandb.errors.Error; ValueError: how
    # the public API says "not found"; OSError: a download that could not be written.
    except (Error, WandbApiFailedError, ValueError, OSError) as e:
        raise UsageError(f"{what}: {first_line(e)}") from None


@contextlib.contextmanager
def wandb_api(what: str, needs_online: str | None = None, entity: str | None = None) -> Iterator["wandb.Api"]:
    """W&B's public API with its credentials verified (one request), W&B's refusals inside the block as
    one line, and W&B's service process ended on the way out: an agent started afterwards must not
    inherit it (wandb points child processes at it through WANDB_SERVICE).
    needs_online: why this command cannot work in W&B's offline mode (None: it can).
    entity: the one the command works in, if known (else the API asks W&B for the default one first)."""
    import wandb

    try:
        api = _verified_api(_settings(needs_online), entity)
        with wandb_errors(what):
            yield api
    finally:
        wandb.teardown()


def _settings(needs_online: str | None) -> "wandb.Settings":
    import wandb
    from pydantic import ValidationError

    try:
        settings = wandb.setup().settings
        unset = {k: v for k, v in PATIENCE.items() if getattr(settings, k) is None}
        settings = wandb.setup(wandb.Settings(**unset)).settings
    except ValidationError as e:  # WANDB_MODE=of, WANDB_BASE_URL=host-without-scheme
        raise UsageError(f"W&B's settings (WANDB_* variables, wandb's settings files): "
                         f"{describe_validation_error(e)}") from None
    if needs_online and settings.mode in OFFLINE_MODES:
        raise UsageError(f"W&B is in {settings.mode} mode (WANDB_MODE or `wandb offline`): {needs_online}")
    return settings


def _verified_api(settings: "wandb.Settings", entity: str | None) -> "wandb.Api":
    import wandb
    from wandb.errors import AuthenticationError
    from wandb.sdk.lib import wbauth

    url = settings.base_url
    try:  # what wandb.Api() would find (WANDB_API_KEY, ~/.netrc, ...), but never a prompt: scripts hang on one
        auth = wbauth.authenticate_session(host=url, source="agent", prompt=False, update_session=False)
    except AuthenticationError as e:  # a key of the wrong form
        raise UsageError(f"{first_line(e).rstrip('.')}: {RELOGIN}") from None
    if auth is None:
        raise UsageError(f"no W&B API key for {url}: {LOGIN}")
    # Longer than wandb-core takes to give up, so that its reason (refused, unknown host) is what we get.
    attempts = settings.x_graphql_retry_max + 1
    patience = attempts * (settings.x_graphql_timeout_seconds + settings.x_graphql_retry_wait_max_seconds) + 5
    try:
        return wandb.Api(overrides={"entity": entity} if entity else None, timeout=patience)
    except AuthenticationError as e:
        cause = e.__cause__ or e
        status = getattr(getattr(cause, "response", None), "http_status", None)
        if status in REFUSED:
            raise UsageError(f"W&B at {url} refused the API key ({first_line(cause)}): {RELOGIN}") from None
        raise UsageError(f"cannot reach W&B at {url} ({first_line(cause)}): check the network and "
                         "WANDB_BASE_URL") from None


def find_sweep(api: "wandb.Api", path: str):
    """The sweep at ENTITY/PROJECT/SWEEP_ID, in one request (when the API was made for that entity)."""
    from wandb.errors import CommError

    try:
        return api.sweep(path)
    except CommError as e:
        # W&B answers the same for a sweep that does not exist and one the key may not see: no sweep
        # (which the public API raises as a ValueError, wrapped).
        if isinstance(e.exc, ValueError):
            raise UsageError(f"{path}: no such sweep on W&B at {api.settings['base_url']}, or this API key "
                             "cannot see it") from None
        raise
