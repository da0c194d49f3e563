"""The narrated end-to-end demo behind `halfclose demo` (lab -> leak -> kill -> prevention)."""
