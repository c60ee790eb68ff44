"""The pose domain: rotation/translation geometry (roma), the network, its losses and the BOP metrics."""
