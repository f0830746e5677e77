"""Data: reading, cleaning, deduplicating and tokenizing corpora; chat records and task files."""
