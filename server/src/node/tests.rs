//! Unit tests of the node.
