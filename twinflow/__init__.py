"""TwinFlow: any-step generators trained without a discriminator or frozen teacher."""
__version__ = "0.1.0"
