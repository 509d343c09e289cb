"""Models: the Hugging Face hub, resumable downloads, the local library, and `peregrine pull/ls/rm/search`."""
