//! Progress bars and plain periodic lines for every stage (filled by the store/prepare owner).
