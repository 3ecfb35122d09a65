using Orleans.Concurrency;

namespace OrleansIdempotency.Grains;

/// <summary>One stored response header. A header with several values is stored as several entries.</summary>
[GenerateSerializer, Immutable, Alias("OrleansIdempotency.StoredHeader")]
public readonly record struct StoredHeader([property: Id(0)] string Name, [property: Id(1)] string Value);

/// <summary>
/// The outcome of an action, kept so that every later caller gets the same answer. Immutable once made (its body
/// array included), so Orleans passes it between grains without copying.
/// </summary>
/// <param name="StatusCode">The HTTP status code, or the result code of a non-HTTP action.</param>
/// <param name="Headers">The allow-listed headers that describe the result (never Set-Cookie, Date or hop-by-hop headers).</param>
/// <param name="Body">The body bytes, exactly as first sent; empty when <paramref name="BodyOmitted"/>.</param>
/// <param name="BodyOmitted">
/// True when the body was larger than the storage cap: the first caller got all of it, but it cannot be replayed.
/// </param>
/// <param name="BodyLength">The length of the original body in bytes, whether or not it was stored.</param>
/// <param name="Trailers">
/// The trailers that followed the body (HTTP/2 and later; a gRPC call's status is one), null when it had none. Read as
/// null from a record stored before them.
/// </param>
[GenerateSerializer, Immutable, Alias("OrleansIdempotency.StoredResponse")]
public sealed record StoredResponse(
    [property: Id(0)] int StatusCode,
    [property: Id(1)] IReadOnlyList<StoredHeader> Headers,
    [property: Id(2)] byte[] Body,
    [property: Id(3)] bool BodyOmitted,
    [property: Id(4)] long BodyLength,
    [property: Id(5)] IReadOnlyList<StoredHeader>? Trailers = null)
{
    /// <summary>The characters of every stored header's and trailer's name and value: what they cost beside the body.</summary>
    public long HeaderChars => Chars(Headers) + (Trailers is null ? 0 : Chars(Trailers));

    /// <summary>How many headers and trailers are stored.</summary>
    public int HeaderCount => Headers.Count + (Trailers?.Count ?? 0);

    private static long Chars(IReadOnlyList<StoredHeader> headers)
    {
        long chars = 0;
        foreach (var header in headers)
        {
            chars += header.Name.Length + header.Value.Length;
        }

        return chars;
    }
}
