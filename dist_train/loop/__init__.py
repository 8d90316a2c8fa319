"""The training loop: outer loop, compiled steps, losses, and the guards around them."""
