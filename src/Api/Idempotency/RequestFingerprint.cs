using System.Buffers;
using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;

namespace OrleansIdempotency.AspNetCore;

/// <summary>
/// SHA-256 of what makes two requests "the same request" (DESIGN §4): method, path, normalised query, body bytes.
/// Each part is length-prefixed, so no two different requests frame to the same bytes. Headers are not part of it.
/// </summary>
public static class RequestFingerprint
{
    /// <summary>
    /// Hashes the request, buffering its body so the endpoint can still read it (the body is rewound).
    /// Returns null when the body is longer than <paramref name="maxBodyBytes"/>.
    /// </summary>
    public static async Task<byte[]?> ComputeAsync(HttpRequest request, long maxBodyBytes, CancellationToken cancellationToken)
    {
        if (request.ContentLength > maxBodyBytes)
        {
            return null;
        }

        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        AppendPart(hash, request.Method);
        AppendPart(hash, request.PathBase.Add(request.Path).Value ?? "/");
        AppendPart(hash, NormalizeQuery(request.Query));

        // No buffer limit here: the buffering stream would throw past it, and a chunked body has no length to check
        // up front. The count below stops reading one buffer past the limit instead.
        request.EnableBuffering(bufferThreshold: 64 * 1024);
        var buffer = ArrayPool<byte>.Shared.Rent(16 * 1024);
        try
        {
            long length = 0;
            int read;
            while ((read = await request.Body.ReadAsync(buffer, cancellationToken)) > 0)
            {
                length += read;
                if (length > maxBodyBytes)
                {
                    return null;
                }

                hash.AppendData(buffer, 0, read);
            }

            Span<byte> lengthBytes = stackalloc byte[sizeof(long)];
            BinaryPrimitives.WriteInt64BigEndian(lengthBytes, length);
            hash.AppendData(lengthBytes);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }

        request.Body.Position = 0;
        return hash.GetHashAndReset();
    }

    /// <summary>
    /// The query with its parameters sorted by name (ordinal) and re-encoded, so <c>?b=2&amp;a=1</c> and
    /// <c>?a=1&amp;b=2</c> are the same request. Repeated values keep their order: <c>?a=1&amp;a=2</c> is not <c>?a=2&amp;a=1</c>.
    /// </summary>
    public static string NormalizeQuery(IQueryCollection query)
    {
        if (query.Count == 0)
        {
            return "";
        }

        var builder = new StringBuilder();
        foreach (var name in query.Keys.Order(StringComparer.Ordinal))
        {
            foreach (var value in query[name])
            {
                builder.Append(builder.Length == 0 ? "" : "&")
                    .Append(Uri.EscapeDataString(name)).Append('=').Append(Uri.EscapeDataString(value ?? ""));
            }
        }

        return builder.ToString();
    }

    private static void AppendPart(IncrementalHash hash, string part)
    {
        var bytes = Encoding.UTF8.GetBytes(part);
        Span<byte> length = stackalloc byte[sizeof(int)];
        BinaryPrimitives.WriteInt32BigEndian(length, bytes.Length);
        hash.AppendData(length);
        hash.AppendData(bytes);
    }
}
