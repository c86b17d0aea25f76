"""Analysis of what the runtime saw: routing traces and what they imply for caching."""
