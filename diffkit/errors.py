"""One exception type for problems a user can fix.

The CLI turns a :class:`DiffkitError` into a one-line message and exit status 2; anything else is a
bug and keeps its traceback. Messages name the problem and the fix in one sentence.
"""


class DiffkitError(Exception):
    """Bad input or state that the user can correct (wrong path, unknown hook, corrupt shard...)."""



def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the hub was not reached: offline mode, no connection,
    a timeout, or a cache miss with downloads disabled."""
    seen = 0
    while exc is not None and seen < 8:
        names = {c.__name__ for c in type(exc).__mro__}
        if names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectError",
                    "ConnectTimeout", "TimeoutError", "Timeout"} or "couldn't connect" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def hub_error(what: str, exc: BaseException) -> DiffkitError:
    """One line for a failed Hugging Face hub load of ``what`` (e.g. "model 'gpt2'").

    transformers raises OSError ("couldn't connect"), huggingface_hub LocalEntryNotFoundError (an
    OSError too); ``HF_HUB_OFFLINE=1`` makes both fail at once, from the cache alone.
    """
    import os

    lines = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {lines[0][:140]}" if lines else type(exc).__name__
    if not _unreachable(exc):
        return DiffkitError(f"{what} could not be loaded from the Hugging Face hub ({reason}): check the name and "
                            "your access (HF_TOKEN), or pass a local directory")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    how = ("HF_HUB_OFFLINE is set, so only the local cache is read: unset it to download once, or pass a local "
           "directory" if offline else
           "connect once so it is cached (HF_HUB_OFFLINE=1 then reads the cache), or pass a local directory")
    return DiffkitError(f"{what} could not be loaded: the Hugging Face hub could not be reached and it is not in "
                        f"the local cache ({reason}); {how}")
