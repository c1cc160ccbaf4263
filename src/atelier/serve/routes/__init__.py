"""One router per resource: health/readiness, items (read, search, write), recommendations, the evaluation report."""
