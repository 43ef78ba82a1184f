"""Model references: a local Hugging Face model directory, or a Hub id `org/name` with an optional `@revision`
(a branch, a tag or a commit), resolved with huggingface_hub into its cache: only the files a run reads (the
config, the safetensors shards and their index, the generation config and the tokenizer files), never pickle
weights. With HF_HUB_OFFLINE=1 a Hub id resolves from the cache alone; one that is not there is an error naming
the id and the cache directory. The cache is HF_HUB_CACHE (or HF_HOME/hub, or huggingface_hub's default), read
when a reference is resolved.

A path that exists is always a local directory; a reference that is neither an existing path nor shaped like a
Hub id is an error naming it.
"""

from __future__ import annotations

import os
import re

from evolver_kernels.errors import ArgumentError
from evolver_kernels.io.model_io import TOKENIZER_FILES

HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_id(ref: str) -> bool:
    """`ref` is shaped like a Hub id (and is not an existing path)."""
    return not os.path.exists(ref) and bool(HUB_ID.match(ref)) and not ref.startswith((".", "~"))


def hub_cache() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve(ref: str) -> str:
    """The local directory of a model reference (downloading a Hub id's files into the cache when online)."""
    if os.path.isdir(ref):
        return ref
    if not is_hub_id(ref):
        raise ArgumentError("model_dir", f"{ref}: no such directory (nor a Hub id org/name[@revision])")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = ref.partition("@")
    cache = hub_cache()
    try:
        return snapshot_download(
            repo, revision=revision or None, cache_dir=cache, local_files_only=offline(), allow_patterns=HUB_FILES
        )
    except LocalEntryNotFoundError:
        why = "offline (HF_HUB_OFFLINE=1)" if offline() else "and the Hub could not be reached"
        raise ArgumentError("model_dir", f"{ref}: not in the Hugging Face cache {cache}, {why}") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        detail = " ".join(str(err).split())[:300]
        raise ArgumentError("model_dir", f"{ref}: the Hub refused it ({type(err).__name__}: {detail})") from None
