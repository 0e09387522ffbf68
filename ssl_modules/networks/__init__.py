"""The networks the methods train: timm backbones behind one ``Features`` interface, and the heads."""
