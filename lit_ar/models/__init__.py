"""Plain nn.Module cores: architecture only (no lightning import, no autocast, no device or dist calls)."""
