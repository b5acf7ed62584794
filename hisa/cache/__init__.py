"""Paged FP8 indexer key cache and the pooled-block cache that follows its page lifecycle."""
from .layout import (PAGE_SIZE, as_pages, cache_head_dim, gather_request_keys,
                     gather_request_pooled, mark_pooled_unknown, page_bytes, page_views,
                     pooled_row_bytes, pooled_views)
from .paged import PagedIndexerCache, naive_cache_append, paged_cache_append

__all__ = [
    "PAGE_SIZE",
    "PagedIndexerCache",
    "as_pages",
    "cache_head_dim",
    "gather_request_keys",
    "gather_request_pooled",
    "mark_pooled_unknown",
    "naive_cache_append",
    "page_bytes",
    "page_views",
    "paged_cache_append",
    "pooled_row_bytes",
    "pooled_views",
]
