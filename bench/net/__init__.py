"""Network helpers: a TCP proxy standing for an edge's link, and an HTTP/2 frame reader."""
