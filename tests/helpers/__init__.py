"""What the tests share: tiny models, cluster starters, cgroup limits, the repository's paths."""
