"""Pipeline stages: each reads its inputs from RUN, writes its outputs under RUN, and is idempotent."""
