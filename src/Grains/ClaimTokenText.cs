using System.Buffers.Binary;
using System.Buffers.Text;

namespace OrleansIdempotency.Grains;

/// <summary>
/// A claim as HTTP callers hold it (the Once API's token, the operator surface's <c>claim</c>): the attempt id and the
/// fencing token, base64url.
/// </summary>
public static class ClaimTokenText
{
    private const int Length = 24;

    /// <summary>The claim as text: its attempt id and fencing token, base64url.</summary>
    public static string Format(ClaimToken token)
    {
        Span<byte> bytes = stackalloc byte[Length];
        token.AttemptId.TryWriteBytes(bytes);
        BinaryPrimitives.WriteInt64BigEndian(bytes[16..], token.FencingToken);
        return Base64Url.EncodeToString(bytes);
    }

    /// <summary>Reads a claim <see cref="Format"/> wrote; false for any other text.</summary>
    public static bool TryParse(string? text, out ClaimToken token)
    {
        token = default;
        Span<byte> bytes = stackalloc byte[Length];
        if (text is null || text.Length != Base64Url.GetEncodedLength(Length)
            || !Base64Url.TryDecodeFromChars(text, bytes, out var written) || written != Length)
        {
            return false;
        }

        token = new ClaimToken(new Guid(bytes[..16]), BinaryPrimitives.ReadInt64BigEndian(bytes[16..]));
        return true;
    }
}
