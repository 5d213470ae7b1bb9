"""Model adapters: one small class per model family; methods never touch a framework."""
