using System.Buffers;
using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;
using Microsoft.AspNetCore.Http.Features;
using Microsoft.Net.Http.Headers;

namespace OrleansIdempotency.AspNetCore;

/// <summary>
/// SHA-256 of what makes two requests "the same request" (DESIGN §4): method, route, normalised query, body bytes
/// (a multipart form's fields and files). Each part is length-prefixed, so no two different requests frame to the same
/// bytes. Headers are not part of it, but for the Content-Type that says a body is a multipart form.
/// </summary>
/// <remarks>
/// The body is hashed from its start, wherever a middleware before the layer left it. A multipart form is hashed as
/// its fields and files, its boundary (new each time a client sends the form) not part of it; so is any form a
/// middleware before the layer read without buffering (an antiforgery check, say), which leaves no bytes to hash.
/// </remarks>
public static class RequestFingerprint
{
    /// <summary>
    /// Hashes the request, buffering its body so the endpoint can still read it (the body is rewound).
    /// Returns null when the body is longer than <paramref name="maxBodyBytes"/>.
    /// </summary>
    /// <remarks>
    /// The fingerprint of an endpoint that its method and path tell apart; one bound to some hosts, or a gateway
    /// route matched by host or header, hashes a route part besides (DESIGN §4's route).
    /// </remarks>
    public static Task<byte[]?> ComputeAsync(HttpRequest request, long maxBodyBytes, CancellationToken cancellationToken) =>
        ComputeAsync(request, null, maxBodyBytes, cancellationToken);

    /// <summary>
    /// Hashes the request with <paramref name="route"/>: what tells its endpoint apart from others on the same path
    /// (<see cref="IdempotencyPolicy.Route"/>), or null for an endpoint its method and path tell apart, whose framing
    /// is the one every earlier fingerprint was made with.
    /// </summary>
    internal static async Task<byte[]?> ComputeAsync(HttpRequest request, string? route, long maxBodyBytes, CancellationToken cancellationToken)
    {
        if (request.ContentLength > maxBodyBytes)
        {
            return null;
        }

        using var framed = Begin(request, route);
        if (!request.Body.CanSeek && FormReadBefore(request) is { } form)
        {
            return await AppendFormAsync(framed, form, maxBodyBytes, cancellationToken) ? framed.Hash() : null;
        }

        // No buffer limit here: the buffering stream would throw past it, and a chunked body has no length to check
        // up front. The count below stops reading one read past the limit instead.
        request.EnableBuffering(bufferThreshold: 64 * 1024);
        request.Body.Position = 0;
        long length = 0;
        int read;
        while ((read = await request.Body.ReadAsync(framed.Free(), cancellationToken)) > 0)
        {
            length += read;
            if (length > maxBodyBytes)
            {
                return null;
            }

            framed.Advance(read);
        }

        request.Body.Position = 0;
        if (IsMultipartForm(request) && await FormOfAsync(request, cancellationToken) is { } sent)
        {
            // A multipart form is hashed as its fields and files, as when a middleware before the layer read it: a
            // client sending it again picks a new boundary (curl, browsers, Python's requests each do), and the form is
            // the same. One the form reader refuses (malformed, past FormOptions' limits) is hashed as the bytes above.
            using var ofForm = Begin(request, route);
            var within = await AppendFormAsync(ofForm, sent, maxBodyBytes, cancellationToken);
            request.Body.Position = 0;
            return within ? ofForm.Hash() : null;
        }

        AppendLength(framed, length);
        return framed.Hash();
    }

    private static FramedSha256 Begin(HttpRequest request, string? route)
    {
        var framed = new FramedSha256();
        if (route is not null)
        {
            AppendRoute(framed, route);
        }

        framed.AppendPart(request.Method);
        framed.AppendPart(request.PathBase.Add(request.Path).Value ?? "/");
        framed.AppendPart(NormalizeQuery(request.Query));
        return framed;
    }

    // A form a middleware before the layer read without buffering (an antiforgery check, say), which left no bytes to
    // hash. Not one whose antiforgery token that check found invalid: the form refuses to be read then, and the
    // endpoint answers for it.
    private static IFormCollection? FormReadBefore(HttpRequest request)
    {
        try
        {
            return request.HttpContext.Features.Get<IFormFeature>()?.Form;
        }
        catch (InvalidOperationException)
        {
            return null;
        }
    }

    // Read from the header itself: HttpRequest.HasFormContentType reads the form feature, which throws for a request
    // whose antiforgery token was found invalid. An urlencoded form is hashed as its bytes: it has no boundary, so a
    // client sends it again as the same bytes, and its parsing would make different bodies alike (a+b and a%2Bb). Every
    // idempotent request asks: one whose type does not even start so (JSON, say) is told without a parse.
    private const string MultipartForm = "multipart/form-data";

    private static bool IsMultipartForm(HttpRequest request) =>
        request.ContentType is { } contentType
        && contentType.AsSpan().TrimStart().StartsWith(MultipartForm, StringComparison.OrdinalIgnoreCase)
        && MediaTypeHeaderValue.TryParse(contentType, out var type)
        && type.MediaType.Equals(MultipartForm, StringComparison.OrdinalIgnoreCase);

    // The form, read from the buffered body (which the endpoint can still read, or take the form from), or null for
    // one the form reader refuses. The body is all buffered by now: an error here is of its content, not the client's.
    private static async Task<IFormCollection?> FormOfAsync(HttpRequest request, CancellationToken cancellationToken)
    {
        try
        {
            return await request.ReadFormAsync(cancellationToken);
        }
        catch (Exception ex) when (ex is InvalidDataException or IOException or InvalidOperationException)
        {
            return null;
        }
        finally
        {
            request.Body.Position = 0;
        }
    }

    // Every count and length comes before what it counts (the fields, each field's values, the files, each file's
    // bytes), so no two different forms frame alike: fields by name (ordinal), values in order, then each file's
    // name, file name, type and bytes. The trailing -1 is a length no body has, so a form never frames as a body does.
    private static async Task<bool> AppendFormAsync(FramedSha256 framed, IFormCollection form, long maxBodyBytes, CancellationToken cancellationToken)
    {
        long length = 0;
        AppendLength(framed, form.Count);
        foreach (var name in form.Keys.Order(StringComparer.Ordinal))
        {
            var values = form[name];
            framed.AppendPart(name);
            AppendLength(framed, values.Count);
            foreach (var value in values)
            {
                framed.AppendPart(value ?? "");
                length += name.Length + (value?.Length ?? 0);
            }
        }

        AppendLength(framed, form.Files.Count);
        foreach (var file in form.Files)
        {
            length += file.Length;
            if (length > maxBodyBytes)
            {
                return false;
            }

            framed.AppendPart(file.Name);
            framed.AppendPart(file.FileName);
            framed.AppendPart(file.ContentType ?? "");
            AppendLength(framed, file.Length);
            await using var content = file.OpenReadStream();
            int read;
            while ((read = await content.ReadAsync(framed.Free(), cancellationToken)) > 0)
            {
                framed.Advance(read);
            }
        }

        AppendLength(framed, -1);
        return length <= maxBodyBytes;
    }

    // First, behind a part length no part has (-1): the framing without a route starts with the method's length.
    private static void AppendRoute(FramedSha256 framed, string route)
    {
        Span<byte> marker = stackalloc byte[sizeof(int)];
        BinaryPrimitives.WriteInt32BigEndian(marker, -1);
        framed.Append(marker);
        framed.AppendPart(route);
    }

    private static void AppendLength(FramedSha256 framed, long length)
    {
        Span<byte> bytes = stackalloc byte[sizeof(long)];
        BinaryPrimitives.WriteInt64BigEndian(bytes, length);
        framed.Append(bytes);
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

    /// <summary>
    /// SHA-256 of bytes gathered in one pooled buffer and hashed in one call, which costs about half of an incremental
    /// hash's several calls into the platform's crypto library; what outgrows the buffer is hashed incrementally, to
    /// the same result.
    /// </summary>
    private sealed class FramedSha256 : IDisposable
    {
        private const int BufferBytes = 16 * 1024;

        // Less room than this left for the body, and the gathered bytes are hashed first: reads stay a useful size.
        private const int MinimumRead = 4 * 1024;

        private readonly byte[] buffer = ArrayPool<byte>.Shared.Rent(BufferBytes);
        private int used;
        private IncrementalHash? overflow;

        /// <summary>Appends a length-prefixed string: no two different sequences of parts frame to the same bytes.</summary>
        public void AppendPart(string part)
        {
            var length = Encoding.UTF8.GetByteCount(part);
            Span<byte> prefix = stackalloc byte[sizeof(int)];
            BinaryPrimitives.WriteInt32BigEndian(prefix, length);
            Append(prefix);
            if (length > buffer.Length)
            {
                Append(Encoding.UTF8.GetBytes(part));
                return;
            }

            Reserve(length);
            used += Encoding.UTF8.GetBytes(part, buffer.AsSpan(used));
        }

        public void Append(ReadOnlySpan<byte> data)
        {
            if (data.Length > buffer.Length)
            {
                HashGathered();
                overflow!.AppendData(data);
                return;
            }

            Reserve(data.Length);
            data.CopyTo(buffer.AsSpan(used));
            used += data.Length;
        }

        /// <summary>Room to read into; <see cref="Advance"/> says how much of it was filled.</summary>
        public Memory<byte> Free()
        {
            Reserve(MinimumRead);
            return buffer.AsMemory(used);
        }

        public void Advance(int count) => used += count;

        public byte[] Hash()
        {
            if (overflow is null)
            {
                return SHA256.HashData(buffer.AsSpan(0, used));
            }

            HashGathered();
            return overflow.GetHashAndReset();
        }

        public void Dispose()
        {
            overflow?.Dispose();
            ArrayPool<byte>.Shared.Return(buffer);
        }

        private void Reserve(int count)
        {
            if (buffer.Length - used < count)
            {
                HashGathered();
            }
        }

        private void HashGathered()
        {
            overflow ??= IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
            overflow.AppendData(buffer, 0, used);
            used = 0;
        }
    }
}
