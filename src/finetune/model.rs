//! (skeleton: its owner fills this file)
