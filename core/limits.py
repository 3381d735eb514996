"""Every size limit and default in one place: the public API's (checked by the gateway, named in
INVALID_ARGUMENT messages and in protos/fusionrec.proto), the internal services', and the
retrieval defaults the build tunes from."""
from __future__ import annotations

from core.channel_names import ChannelName

# -- public API (gateway)
MAX_K = 100                 # items per Recommend
MAX_USER_ID = 256           # characters
MAX_ITEM_ID = 256           # characters
MAX_EXCLUDE = 10_000        # exclude_item_ids
MAX_HISTORY = 1_000         # history_item_ids
MAX_SURFACE = 64            # characters
MAX_REQUEST_ID = 128        # characters
MAX_EVENT_BATCH = 1_000     # events per batch
MAX_UPSERT = 256            # items per UpsertItems
MAX_DELETE = 10_000         # ids per DeleteItems
MAX_TITLE = 1_000           # characters
MAX_TEXT = 10_000           # characters
MAX_CATEGORY = 256          # characters
EVENT_OLDEST_S = 946_684_800.0   # 2000-01-01: an event timestamp before it is a unit mistake
EVENT_FUTURE_SKEW_S = 60.0       # how far past the gateway's clock an event timestamp may be

# -- internal services
# A Retrieve's exclude list is the caller's exclusions alone (deleted items are retrieval's own filter).
MAX_RETRIEVE_EXCLUDE = MAX_EXCLUDE
MAX_RETRIEVE_HISTORY = 1_000
MAX_RETRIEVE_CANDIDATES = 2_000
MAX_RANK_HISTORY = 1_000
MAX_RANK_CANDIDATES = 1_000
MAX_RANK_K = MAX_K               # Rank serves the public k unchanged

# -- retrieval defaults (the build tunes quotas on validation users and records them in the manifest)
DEFAULT_CANDIDATES = 300
# A set without a sequential channel leaves its share to the others (core.merge fills up).
DEFAULT_QUOTAS = {ChannelName.BERT: 45, ChannelName.CF: 75, ChannelName.POPULAR: 15, ChannelName.ITEM2ITEM: 90,
                  ChannelName.SEQUENTIAL: 75}
BERT_HISTORY = 50           # only the most recent part of a history shapes the content vector
ITEM2ITEM_HISTORY = 50      # the item-to-item channel sums the neighbours of this many recent items
ITEM2ITEM_DECAY = 0.95      # ... each one weighing this much less than the next newer one
