"""What the tests share: tiny models, cluster starters, cgroup limits, the repository's paths,
processes that end with their test (``processes``), deadlines, in-process ring allreduces."""
