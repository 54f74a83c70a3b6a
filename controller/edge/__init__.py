"""The HTTP edge: access policy, origins, peers, throttling, error shapes, bodies and deadlines."""
