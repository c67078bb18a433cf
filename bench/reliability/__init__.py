"""`make reliability`: hostile input, faults under load, overload and a soak against the real service."""
