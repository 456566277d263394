from .caches import CacheConfig, NoCache, TaylorSeer, TeaCache

__all__ = ["CacheConfig", "NoCache", "TaylorSeer", "TeaCache"]
