"""MRIDC Edge."""
