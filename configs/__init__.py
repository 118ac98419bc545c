"""Run configs that ship with diffpipe (package data: ``diffpipe run --config quickstart``)."""
