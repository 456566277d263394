from .caches import CacheConfig, NoCache, TaylorSeer, TeaCache
from .compile import compile_blocks

__all__ = ["CacheConfig", "NoCache", "TaylorSeer", "TeaCache", "compile_blocks"]
