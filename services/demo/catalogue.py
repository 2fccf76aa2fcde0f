"""The demo shop's catalogue: its categories, product lines, brands with their price tiers and the category
groups the simulator's tastes and the banners refer to. Pure data; shop.py generates items from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class ProductLine:
    """One kind of product (e.g. "Serum Vitamin C"): who makes it, its variants and its typical price."""

    noun: str
    brands: tuple[str, ...]
    variants: tuple[str, ...]
    median_price: float  # IDR, median of the log-normal
    sigma: float = 0.25  # spread of log(price) within the line


@dataclass(frozen=True)
class CategorySpec:
    """A category: its product lines, how many products it has and how titles are written."""

    slug: str
    name_id: str
    name_en: str
    weight: float  # relative number of products
    lines: tuple[ProductLine, ...]
    # Extra title suffixes (colour, pack size) with a price multiplier; they widen the catalog realistically.
    extras: tuple[tuple[str, float], ...] = (("", 1.0),)
    title_format: str = "{brand} {noun} - {variant}{extra}"
    consumable: bool = False  # bought several at a time, again and again

    @property
    def brands(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(brand for line in self.lines for brand in line.brands))


def _line(noun: str, brands: str, variants: str, median_price: float, sigma: float = 0.25) -> ProductLine:
    """Compact constructor: brands and variants are "|"-separated so the table below stays readable."""
    return ProductLine(noun, tuple(brands.split("|")), tuple(variants.split("|")), median_price, sigma)


def _phone(brand: str, model: str, variants: str, median_price: float) -> ProductLine:
    return _line(model, brand, variants, median_price, 0.08)


COLORS = "Hitam|Putih|Navy|Dusty Pink|Sage Green|Mocca|Maroon|Cream"
MEN_COLORS = "Hitam|Putih|Navy|Abu Misty|Olive|Khaki|Biru Dongker"
SHOE_COLORS = "Hitam/Putih|Navy|Abu-abu|Putih|Hijau Neon"
SHADES = "01 Nude|02 Rosy|03 Coral|04 Red Velvet|05 Mauve|06 Brick"
BASE_SHADES = "01 Light|02 Natural|03 Beige|04 Tan"
WIN = "Core i5 8GB 512GB|Ryzen 5 16GB 512GB|Core i7 16GB 1TB"
PACKS = (("", 1.0), ("Paket 2 pcs", 1.9), ("Paket 3 pcs", 2.7))
CARTONS = (("", 1.0), ("Karton Isi 12", 10.5), ("Karton Isi 24", 20.0))
WARRANTY = (("", 1.0), ("Garansi Resmi", 1.05))
PHONE_COLORS = (("Hitam", 1.0), ("Biru", 1.0), ("Hijau", 1.0), ("Silver", 1.0))

CATEGORIES: Final[tuple[CategorySpec, ...]] = (
    CategorySpec("fashion-wanita", "Fashion Wanita", "Women's Fashion", 1.7, (
        _line("Blouse Lengan Panjang", "Cotton Ink|Berrybenka|Zara|H&M", COLORS, 149_000),
        _line("Gamis Syari", "Elzatta|Heaven Lights|Rabbani", COLORS, 299_000),
        _line("Dress Midi", "Zara|H&M|Cotton Ink|Berrybenka", COLORS, 249_000),
        _line("Rok Plisket", "Berrybenka|Cotton Ink|Uniqlo", COLORS, 129_000),
        _line("Kemeja Oversize", "Uniqlo|H&M|Cotton Ink", COLORS, 179_000),
        _line("Cardigan Rajut", "Uniqlo|H&M|Zara|Berrybenka", COLORS, 199_000),
        _line("Celana Kulot", "Cotton Ink|Uniqlo|Berrybenka", COLORS, 139_000),
        _line("Hijab Segi Empat Voal", "Buttonscarves|Heaven Lights|Elzatta|Rabbani", COLORS, 89_000, 0.5),
        _line("Tunik Katun", "Elzatta|Rabbani|Cotton Ink", COLORS, 169_000),
    )),
    CategorySpec("fashion-pria", "Fashion Pria", "Men's Fashion", 1.3, (
        _line("Kaos Polos Cotton Combed 30s", "Erigo|Uniqlo|3Second|Bloods", MEN_COLORS, 89_000),
        _line("Kemeja Flanel", "Erigo|Roughneck 1991|Uniqlo", MEN_COLORS, 199_000),
        _line("Celana Chino Slim Fit", "The Executive|Uniqlo|Erigo", MEN_COLORS, 249_000),
        _line("Jaket Bomber", "Erigo|Roughneck 1991|3Second", MEN_COLORS, 299_000),
        _line("Hoodie Oversize", "Erigo|Bloods|3Second|Roughneck 1991", MEN_COLORS, 229_000),
        _line("Celana Jeans Reguler", "Levi's|The Executive|3Second", "Light Blue|Dark Blue|Hitam|Stone Wash",
              349_000),
        _line("Polo Shirt", "The Executive|Uniqlo|Levi's", MEN_COLORS, 199_000),
        _line("Kemeja Batik Lengan Panjang", "Danar Hadi|Batik Keris|Alisan",
              "Parang|Kawung|Mega Mendung|Truntum|Sogan", 299_000),
    )),
    CategorySpec("sepatu-olahraga", "Sepatu Olahraga", "Sports Shoes", 1.0, (
        _line("Sepatu Lari", "Nike|Adidas|Ortuseight|Specs|League|Puma", SHOE_COLORS, 599_000, 0.3),
        _line("Sepatu Futsal", "Specs|Ortuseight|Nike|Adidas|League", SHOE_COLORS, 399_000, 0.3),
        _line("Sepatu Sneakers", "Ventela|Compass|Nike|Adidas|Puma", SHOE_COLORS, 449_000, 0.3),
        _line("Sepatu Training", "Nike|Adidas|Puma|Ortuseight", SHOE_COLORS, 599_000, 0.3),
        _line("Sepatu Badminton", "Yonex|Li-Ning|Specs", SHOE_COLORS, 499_000, 0.3),
        _line("Sepatu Basket", "Nike|Adidas|League|Ardiles", SHOE_COLORS, 699_000, 0.3),
    )),
    CategorySpec("kecantikan", "Kecantikan", "Beauty", 1.4, (
        _line("Lipstik Matte", "Wardah|Make Over|Emina|Maybelline|Pixy|Implora|Barenbliss", SHADES, 59_000),
        _line("Cushion SPF 33", "Wardah|Make Over|Maybelline|Somethinc|Barenbliss", BASE_SHADES, 149_000),
        _line("Bedak Padat", "Wardah|Pixy|Emina|Make Over|Marcks", BASE_SHADES, 49_000),
        _line("Maskara Waterproof", "Maybelline|Make Over|Wardah|Implora", "Hitam|Cokelat", 79_000),
        _line("Eyeliner Pen", "Maybelline|Implora|Make Over|Emina", "Hitam|Cokelat", 59_000),
        _line("Lip Tint", "Emina|Implora|Barenbliss|Somethinc|Wardah|Pinkflash", SHADES, 45_000),
        _line("Foundation Cair", "Make Over|Maybelline|Wardah|Somethinc", BASE_SHADES, 129_000),
        _line("Blush On", "Emina|Make Over|Pixy|Barenbliss", SHADES, 59_000),
        _line("Setting Spray", "Make Over|Somethinc|Emina", "60 ml|100 ml", 89_000),
    )),
    CategorySpec("perawatan-kulit", "Perawatan Kulit", "Skincare", 1.3, (
        _line("Serum Vitamin C", "Somethinc|Scarlett|Avoskin|Wardah|Azarine|Skintific", "15 ml|20 ml|30 ml",
              99_000),
        _line("Serum Niacinamide", "Somethinc|Skintific|Azarine|Npure|Emina", "15 ml|20 ml|30 ml", 89_000),
        _line("Moisturizer Gel", "Skintific|Wardah|Emina|Npure|Azarine|Garnier", "30 g|50 g|80 g", 89_000),
        _line("Sunscreen SPF 50 PA++++", "Azarine|Skintific|Wardah|Emina|Somethinc|Garnier",
              "30 ml|40 ml|50 ml", 69_000),
        _line("Facial Wash", "Wardah|Garnier|Emina|Npure|Skintific|Scarlett", "100 ml|150 ml", 39_000),
        _line("Toner Exfoliasi", "Somethinc|Avoskin|Npure|Azarine", "100 ml|200 ml", 99_000),
        _line("Sheet Mask", "Garnier|Scarlett|Emina|Npure", "Isi 1|Isi 5|Isi 10", 25_000, 0.6),
        _line("Night Cream", "Wardah|Scarlett|Skintific|Garnier", "20 g|30 g", 79_000),
        _line("Micellar Water", "Garnier|Wardah|Emina", "100 ml|125 ml|400 ml", 49_000, 0.4),
        _line("Body Lotion", "Scarlett|Vaseline|Citra|Marina", "200 ml|300 ml|400 ml", 45_000, 0.35),
        _line("Paket Skincare Glowing", "Scarlett|Somethinc|Skintific|Wardah|Avoskin",
              "Paket 3 in 1|Paket 5 in 1|Travel Kit", 199_000, 0.4),
    ), extras=(("", 1.0), ("Twin Pack", 1.85))),
    CategorySpec("makanan-ringan", "Makanan Ringan", "Snacks", 1.0, (
        _line("Keripik Kentang 68 g", "Chitato|Lay's|Potabee", "Sapi Panggang|Keju|Original|Rumput Laut",
              12_000),
        _line("Wafer", "Tango|Nabati|Richeese", "Cokelat|Vanila|Keju", 9_000),
        _line("Biskuit Sandwich", "Oreo|Roma|Monde", "Original|Cokelat|Vanila|Stroberi", 10_000),
        _line("Cokelat Batang", "SilverQueen|Delfi|Cadbury", "Almond|Cashew|Milk|Dark 55%", 22_000),
        _line("Keripik Singkong", "Qtela|Kusuka|Maicih", "Balado|Original|Pedas|Barbeque", 12_000),
        _line("Biskuit Stik", "Pocky|Yan Yan|Roma", "Cokelat|Stroberi|Matcha|Cookies & Cream", 9_000),
        _line("Biskuit Kaleng", "Khong Guan|Monde|Nissin", "650 g|1,6 kg", 79_000, 0.35),
        _line("Stik Keju", "Richeese|Taro|Chiki", "Keju|Jagung Bakar|Pedas", 8_000),
    ), extras=(("", 1.0), ("Isi 5", 4.7), ("Isi 10", 9.0)), consumable=True),
    CategorySpec("minuman", "Minuman", "Drinks", 1.0, (
        _line("Kopi Sachet Isi 10", "Kapal Api|Good Day|Torabika|Kopiko|ABC",
              "Mocacinno|Original|Cappuccino|Gula Aren", 16_000),
        _line("Teh Siap Minum 350 ml", "Teh Pucuk Harum|Sosro|Frestea", "Melati|Apel|Less Sugar", 4_000),
        _line("Susu UHT", "Ultra Milk|Indomilk|Frisian Flag|Greenfields",
              "Cokelat 1 L|Full Cream 1 L|Stroberi 200 ml|Full Cream 200 ml", 12_000, 0.6),
        _line("Minuman Isotonik", "Pocari Sweat|Mizone|100Plus", "500 ml|350 ml", 7_000),
        _line("Air Mineral", "Le Minerale|Aqua|Cleo", "600 ml|1,5 L", 4_500),
        _line("Kopi Susu Botol 225 ml", "Kopi Kenangan|Good Day|Nescafe|Kopiko", "Original|Gula Aren", 9_000),
    ), extras=CARTONS, consumable=True),
    CategorySpec("kebutuhan-dapur", "Kebutuhan Dapur", "Groceries", 1.1, (
        _line("Mie Instan Isi 5", "Indomie|Sedaap|Sarimi|Supermi",
              "Goreng|Soto|Ayam Bawang|Kari Ayam|Rendang", 15_000),
        _line("Minyak Goreng", "Bimoli|Sania|Filma|Tropical", "1 L|2 L|Pouch 2 L", 38_000),
        _line("Kecap Manis", "ABC|Bango|Sedaap", "520 ml|275 ml|Refill 550 ml", 25_000),
        _line("Beras Premium", "Sania|Topi Koki|Raja", "5 kg|10 kg", 85_000, 0.35),
        _line("Gula Pasir", "Gulaku|Rose Brand", "1 kg|2 kg", 19_000),
        _line("Tepung Terigu 1 kg", "Segitiga Biru|Rose Brand|Cakra Kembar", "Serbaguna|Protein Tinggi",
              14_000),
        _line("Saus Sambal", "ABC|Indofood|Del Monte", "340 ml|Sachet Isi 24", 18_000),
        _line("Kaldu Bubuk", "Royco|Masako|Totole", "Ayam|Sapi|Jamur", 12_000),
        _line("Bumbu Instan", "Bamboe|Indofood|Sasa", "Rendang|Opor|Nasi Goreng|Soto", 7_000),
    ), extras=PACKS, consumable=True),
    CategorySpec("elektronik", "Elektronik", "Electronics", 1.1, (
        _line("Smart TV", "Samsung|LG|Sharp|Polytron|Xiaomi", "32 Inch|43 Inch 4K|50 Inch 4K",
              3_900_000, 0.4),
        _line("Kulkas 2 Pintu", "Sharp|LG|Samsung|Polytron|Panasonic", "180 L|250 L|Inverter 300 L",
              3_200_000),
        _line("Mesin Cuci Front Loading", "LG|Samsung|Sharp|Panasonic", "7 kg|8 kg|9 kg", 4_500_000),
        _line("Rice Cooker Digital", "Miyako|Cosmos|Philips|Panasonic|Sharp", "1 L|1,8 L|2 L", 399_000, 0.4),
        _line("Blender", "Philips|Miyako|Cosmos|Panasonic", "1,5 L|2 L", 349_000, 0.35),
        _line("Setrika Uap", "Philips|Panasonic|Cosmos|Miyako", "Putih|Biru", 299_000, 0.35),
        _line("Kipas Angin Berdiri", "Miyako|Cosmos|Panasonic|Maspion", "16 Inch|18 Inch", 249_000),
        _line("AC Inverter", "Sharp|Panasonic|LG|Daikin|Polytron", "1/2 PK|1 PK|1,5 PK", 4_200_000),
        _line("Air Fryer", "Philips|Xiaomi|Cosmos|Kirin", "4 L|5,5 L", 899_000, 0.4),
        _line("Vacuum Cleaner", "Xiaomi|Philips|Electrolux", "Cordless|Robot|Handheld", 1_800_000, 0.5),
    ), extras=WARRANTY),
    CategorySpec("handphone", "Handphone", "Phones", 0.9, (
        _phone("Samsung", "Galaxy A15", "6/128GB|8/256GB", 2_400_000),
        _phone("Samsung", "Galaxy A35 5G", "8/128GB|8/256GB", 4_600_000),
        _phone("Samsung", "Galaxy A55 5G", "8/128GB|8/256GB", 5_800_000),
        _phone("Samsung", "Galaxy S24", "8/256GB|8/512GB", 12_900_000),
        _phone("Samsung", "Galaxy Z Flip6", "12/256GB|12/512GB", 17_000_000),
        _phone("Xiaomi", "Redmi 13C", "4/128GB|6/128GB|8/256GB", 1_500_000),
        _phone("Xiaomi", "Redmi Note 13", "6/128GB|8/256GB", 2_600_000),
        _phone("Xiaomi", "Redmi Note 13 Pro 5G", "8/256GB|12/512GB", 4_300_000),
        _phone("Xiaomi", "Poco X6 Pro", "8/256GB|12/512GB", 4_800_000),
        _phone("Xiaomi", "Xiaomi 14T", "12/256GB|12/512GB", 6_900_000),
        _phone("Oppo", "A18", "4/64GB|4/128GB", 1_600_000),
        _phone("Oppo", "A79 5G", "8/256GB", 3_200_000),
        _phone("Oppo", "Reno12 Pro 5G", "12/256GB|12/512GB", 7_500_000),
        _phone("Oppo", "Find X8", "12/256GB|16/512GB", 13_000_000),
        _phone("Vivo", "Y18", "4/128GB|6/128GB", 1_700_000),
        _phone("Vivo", "Y36", "8/256GB", 2_800_000),
        _phone("Vivo", "V30 5G", "8/256GB|12/512GB", 5_900_000),
        _phone("Vivo", "X200", "12/256GB|12/512GB", 12_500_000),
        _phone("Realme", "Note 60", "4/64GB|4/128GB", 1_400_000),
        _phone("Realme", "C67", "6/128GB|8/256GB", 2_300_000),
        _phone("Realme", "12 Pro+ 5G", "8/256GB|12/512GB", 5_500_000),
        _phone("Realme", "GT 6", "12/256GB|16/512GB", 8_000_000),
        _phone("Apple", "iPhone 13", "128GB|256GB", 9_500_000),
        _phone("Apple", "iPhone 15", "128GB|256GB", 13_000_000),
        _phone("Apple", "iPhone 15 Pro", "128GB|256GB|512GB", 18_000_000),
        _phone("Apple", "iPhone 16 Pro Max", "256GB|512GB", 23_000_000),
        _phone("Infinix", "Hot 40i", "4/128GB|8/256GB", 1_500_000),
        _phone("Infinix", "Hot 50 Pro", "8/256GB", 2_200_000),
        _phone("Infinix", "Note 40 Pro", "8/256GB|12/256GB", 3_200_000),
        _phone("Infinix", "GT 20 Pro", "12/256GB", 3_900_000),
    ), extras=PHONE_COLORS, title_format="{brand} {noun} {variant}{extra}"),
    CategorySpec("laptop", "Laptop", "Laptops", 0.6, (
        _phone("Asus", "Vivobook 14", WIN, 7_500_000),
        _phone("Asus", "Zenbook 14 OLED", WIN, 14_000_000),
        _phone("Asus", "TUF Gaming F15", WIN, 12_000_000),
        _phone("Asus", "ROG Strix G16", "Core i7 16GB 1TB RTX 4060|Core i9 32GB 1TB RTX 4070", 24_000_000),
        _phone("Lenovo", "IdeaPad Slim 3", WIN, 7_000_000),
        _phone("Lenovo", "IdeaPad Slim 5", WIN, 11_000_000),
        _phone("Lenovo", "ThinkPad E14", WIN, 13_000_000),
        _phone("Lenovo", "LOQ 15", WIN, 14_000_000),
        _phone("Acer", "Aspire 5", WIN, 8_000_000),
        _phone("Acer", "Swift Go 14", WIN, 11_000_000),
        _phone("Acer", "Nitro V 15", WIN, 12_000_000),
        _phone("Acer", "Predator Helios Neo 16", "Core i7 16GB 1TB RTX 4060|Core i9 32GB 1TB RTX 4070",
               22_000_000),
        _phone("HP", "14s", WIN, 6_500_000),
        _phone("HP", "Pavilion Aero 13", WIN, 11_000_000),
        _phone("HP", "Victus 15", WIN, 12_000_000),
        _phone("Apple", "MacBook Air 13 M2", "8GB 256GB|16GB 512GB", 15_000_000),
        _phone("Apple", "MacBook Air 15 M3", "8GB 256GB|16GB 512GB", 22_000_000),
        _phone("Apple", "MacBook Pro 14 M3", "8GB 512GB|18GB 512GB", 28_000_000),
        _phone("Axioo", "MyBook Hype 5", "Core i5 8GB 256GB|Core i5 16GB 512GB", 5_000_000),
        _phone("MSI", "Modern 14", WIN, 7_500_000),
        _phone("MSI", "Katana 15", "Core i7 16GB 1TB RTX 4050|Core i7 16GB 1TB RTX 4060", 15_000_000),
    ), extras=(("", 1.0), ("Free Office", 1.06), ("Garansi 2 Tahun", 1.04))),
    CategorySpec("aksesoris-gadget", "Aksesoris Gadget", "Gadget Accessories", 1.2, (
        _line("Charger Fast Charging", "Anker|Baseus|Ugreen|Xiaomi|Samsung|Robot", "20W|33W|65W GaN", 149_000,
              0.4),
        _line("Kabel Data USB-C", "Anker|Baseus|Ugreen|Robot|Vivan", "1 m|2 m", 59_000),
        _line("Power Bank", "Anker|Baseus|Xiaomi|Robot|Vivan", "10000 mAh|20000 mAh", 229_000),
        _line("TWS Earbuds", "Soundcore|JBL|Xiaomi|Baseus|Samsung", "Hitam|Putih", 449_000, 0.6),
        _line("Casing HP Anti Crack", "Spigen|Baseus|Ugreen", "iPhone 15|Galaxy A55|Redmi Note 13", 79_000),
        _line("Tempered Glass", "Spigen|Robot|Vivan", "iPhone 15|Galaxy A55|Redmi Note 13", 39_000),
        _line("Speaker Bluetooth", "JBL|Soundcore|Xiaomi", "Mini|Portable Waterproof", 599_000, 0.5),
        _line("Smartwatch", "Xiaomi|Samsung|Amazfit|Huawei", "Hitam|Silver", 1_200_000, 0.5),
        _line("Holder HP Mobil", "Baseus|Ugreen|Robot", "Dashboard|AC Vent", 89_000),
    ), extras=WARRANTY),
    CategorySpec("rumah-tangga", "Rumah Tangga", "Household", 1.0, (
        _line("Wadah Makanan Kedap Udara", "Lock&Lock|Tupperware|Claris", "Isi 3|Isi 5|Isi 10", 129_000, 0.4),
        _line("Panci Set Stainless", "Maspion|Oxone|Kirin", "3 pcs|5 pcs", 349_000),
        _line("Wajan Anti Lengket", "Maspion|Oxone|Kirin|Lock&Lock", "24 cm|28 cm|30 cm", 189_000),
        _line("Rak Piring 2 Susun", "Claris|Lion Star|Bagus", "Putih|Hijau Mint|Biru", 99_000),
        _line("Set Alat Pel", "Bagus|Lion Star|Claris", "Spin Mop|Pel Lantai Flat", 119_000),
        _line("Botol Minum 1 L", "Tupperware|Lock&Lock|Lion Star", "Biru|Hijau Mint|Pink", 79_000),
        _line("Sabun Cuci Piring Refill", "Sunlight|Mama Lemon|Sleek", "700 ml|1,6 L", 19_000),
        _line("Keranjang Baju", "Claris|Lion Star|Bagus", "Putih|Abu-abu|Biru", 69_000),
    ), extras=(("", 1.0), ("Paket Hemat 2 pcs", 1.9))),
    CategorySpec("dekorasi-rumah", "Dekorasi Rumah", "Home Decor", 0.9, (
        _line("Lampu Tidur Minimalis", "Informa|IKEA|Krisbow", "Putih|Natural Wood|Abu-abu", 149_000),
        _line("Vas Bunga Keramik", "Informa|IKEA|Dekoruma", "Putih|Terracotta|Sage", 89_000),
        _line("Cermin Dinding Bulat", "Informa|IKEA|Dekoruma", "Uk. 50 cm|Uk. 60 cm|Uk. 80 cm", 199_000),
        _line("Karpet Bulu", "Informa|IKEA|Dekoruma", "Uk. 120 x 160 cm|Uk. 160 x 210 cm", 299_000),
        _line("Gorden Blackout", "Informa|IKEA|Dekoruma", "Abu-abu|Cream|Navy", 179_000),
        _line("Jam Dinding Kayu", "Informa|Dekoruma|Krisbow", "Natural Wood|Hitam|Putih", 129_000),
        _line("Rak Dinding Ambalan", "Olympic|Informa|IKEA", "Uk. 60 cm|Uk. 80 cm|Set 3 pcs", 99_000),
        _line("Sarung Bantal Sofa", "Informa|IKEA|Dekoruma", "Cream|Terracotta|Sage|Navy", 59_000),
    ), extras=(("", 1.0), ("Set 2 pcs", 1.9))),
    CategorySpec("ibu-bayi", "Ibu & Bayi", "Mother & Baby", 1.0, (
        _line("Popok Celana", "MamyPoko|Pampers|Sweety|Merries", "M 34|L 30|XL 26|XXL 24", 89_000),
        _line("Botol Susu Anti Kolik", "Pigeon|Dr. Brown's|Philips Avent", "150 ml|250 ml", 119_000, 0.35),
        _line("Tisu Basah Bayi", "Sweety|MamyPoko|Cussons Kids|Pigeon", "Isi 50|Isi 80", 19_000),
        _line("Minyak Telon", "Cussons Kids|Zwitsal|Konicare|My Baby", "60 ml|150 ml", 29_000),
        _line("Susu Formula 1-3 Tahun", "SGM|Dancow|Bebelac|Morinaga", "400 g|900 g", 139_000, 0.4),
        _line("Sabun & Sampo Bayi", "Cussons Kids|Zwitsal|Pigeon|Johnson's", "200 ml|400 ml", 39_000),
        _line("Bedak Bayi", "Cussons Kids|Zwitsal|My Baby|Johnson's", "100 g|200 g", 19_000),
    ), extras=PACKS, consumable=True),
    CategorySpec("mainan", "Mainan", "Toys", 0.8, (
        _line("Classic", "Lego", "Kotak Kreatif Kecil|Kotak Kreatif Besar|Batu Bata 900 pcs", 599_000, 0.5),
        _line("Mobil Die-cast", "Hot Wheels|Matchbox|Tomica", "Isi 5|Track Set|Edisi Kolektor", 149_000, 0.5),
        _line("Boneka", "Barbie|Disney Princess|Kiddy Toys", "Dreamhouse Set|Fashionista|Edisi Liburan",
              249_000, 0.5),
        _line("Puzzle Kayu Edukasi", "Kiddy Toys|Edu Toys|Melissa & Doug", "Huruf|Angka|Peta Indonesia",
              79_000),
        _line("Mainan Masak-masakan", "Kiddy Toys|Edu Toys|Hasbro", "Set Dapur|Set Kue|Set Sarapan", 129_000),
        _line("Blaster", "Nerf|Hasbro|Kiddy Toys", "Elite 2.0|Isi Ulang 30 Peluru|Set Tim", 249_000, 0.5),
        _line("Mobil Remote Control", "Kiddy Toys|Hot Wheels|Rastar", "Off Road|Sport|Polisi", 299_000, 0.45),
    ), extras=(("", 1.0), ("Paket Kado", 1.1))),
    CategorySpec("olahraga", "Olahraga", "Sports", 0.9, (
        _line("Matras Yoga", "Decathlon|Kettler|Eiger", "6 mm|8 mm|10 mm", 179_000),
        _line("Dumbbell Set", "Kettler|Decathlon|Kenko", "2 x 3 kg|2 x 5 kg|Adjustable 20 kg", 299_000, 0.5),
        _line("Raket Badminton", "Yonex|Li-Ning|Apacs", "Astrox 77|Arcsaber 11|Nanoflare 700", 899_000, 0.5),
        _line("Bola Basket", "Molten|Spalding|Decathlon", "Size 5|Size 6|Size 7", 349_000),
        _line("Tas Carrier", "Eiger|Consina|Arei", "35 L|45 L|60 L", 799_000, 0.35),
        _line("Botol Minum Olahraga", "Eiger|Decathlon|Consina", "600 ml|750 ml|1 L", 99_000),
        _line("Resistance Band", "Kettler|Decathlon|Kenko", "Light|Medium|Heavy", 79_000),
        _line("Jaket Outdoor Windproof", "Eiger|Consina|Arei", "Hitam|Hijau Army|Navy", 449_000),
        _line("Shuttlecock", "Yonex|Li-Ning|Apacs", "Isi 6|Isi 12", 99_000),
    ), extras=(("", 1.0), ("Bonus Tas", 1.1))),
    CategorySpec("kesehatan", "Kesehatan", "Health", 0.9, (
        _line("Vitamin C 1000 mg", "Blackmores|Enervon-C|Imboost|Holisticare", "Isi 30|Isi 60", 79_000, 0.4),
        _line("Multivitamin", "Blackmores|Enervon-C|Sido Muncul", "Isi 30|Isi 60", 99_000, 0.4),
        _line("Masker Medis 3 Ply", "Sensi|Hansaplast|Mitra", "Isi 50|Isi 100", 29_000),
        _line("Termometer Digital", "Omron|OneMed|Sinocare", "Ketiak|Dahi Inframerah", 99_000, 0.5),
        _line("Tensimeter Digital", "Omron|OneMed|Sinocare", "Lengan Atas|Pergelangan", 499_000),
        _line("Plester Luka", "Hansaplast|Sensi|Tensoplast", "Isi 10|Isi 100", 15_000, 0.5),
        _line("Herbal Masuk Angin", "Tolak Angin|Sido Muncul|Antangin", "Isi 5 Sachet|Isi 12 Sachet", 25_000),
        _line("Madu Herbal", "Sido Muncul|Madurasa|Nusantara", "250 ml|500 ml", 59_000),
    ), extras=PACKS, consumable=True),
    CategorySpec("otomotif", "Otomotif", "Automotive", 0.8, (
        _line("Oli Mesin Motor", "Shell|Castrol|Federal Oil|Yamalube|AHM", "0,8 L|1 L", 55_000),
        _line("Helm Full Face", "KYT|INK|NHK", "Hitam Doff|Putih|Merah", 699_000, 0.4),
        _line("Helm Half Face", "KYT|INK|NHK|Cargloss", "Hitam Doff|Putih|Navy", 349_000),
        _line("Ban Motor Tubeless", "Aspira|IRC|FDR|Michelin", "80/90 Ring 14|90/90 Ring 14|100/80 Ring 17",
              289_000),
        _line("Sarung Jok Motor", "Aspira|Kit|Takachi", "Beat|Vario|NMAX", 79_000),
        _line("Car Wax", "Kit|Meguiar's|Turtle Wax", "250 ml|500 ml", 89_000, 0.4),
        _line("Lampu LED Motor", "Philips|Osram|Aspira", "H4|H6", 99_000),
        _line("Cover Mobil", "Kit|Takachi|Aspira", "Avanza|Brio|Xpander", 229_000),
    ), extras=(("", 1.0), ("Paket Hemat 2 pcs", 1.9))),
    CategorySpec("buku", "Buku", "Books", 0.9, (
        _line("Novel", "Gramedia Pustaka Utama|Gagas Media|Bentang Pustaka|Mizan",
              "Langit Jingga di Braga|Surat untuk Ibu|Kopi Terakhir di Bandung|Rumah di Ujung Gang"
              "|Jejak Pulang|Laut yang Menunggu", 99_000),
        _line("Buku Resep", "Gramedia Pustaka Utama|Demedia",
              "Masakan Nusantara|Kue Kering Lebaran|Bekal Anak", 89_000),
        _line("Komik", "Elex Media|M&C", "Petualangan Si Kancil|Garuda Muda Vol. 1|Detektif Cilik Vol. 3",
              49_000),
        _line("Latihan Soal UTBK", "Erlangga|Bintang Wahyu|Gramedia Pustaka Utama", "Saintek|Soshum|TPS",
              129_000),
        _line("Pengembangan Diri", "Gramedia Pustaka Utama|Mizan|Bentang Pustaka",
              "Berani Gagal|Seni Menabung|Kerja Cerdas|Tenang di Tengah Riuh", 89_000),
        _line("Cerita Anak", "Bhuana Ilmu Populer|Elex Media|Mizan",
              "Dongeng Nusantara|Fabel Pilihan|Kisah Nabi", 69_000),
    ), extras=(("", 1.0), ("Edisi Tanda Tangan", 1.3), ("Hard Cover", 1.5)),
        title_format="{noun}: {variant} ({brand}){extra}"),
)  # fmt: skip

# Premium and budget brands shift the line's price (Zara above Berrybenka, Nike above Ortuseight).
BRAND_PRICE_TIER: Final[dict[str, float]] = {
    "Zara": 1.6, "H&M": 1.15, "Uniqlo": 1.3, "Buttonscarves": 2.5, "Levi's": 1.7, "The Executive": 1.2,
    "Berrybenka": 0.8, "Rabbani": 0.85, "3Second": 0.9, "Bloods": 0.85, "Danar Hadi": 1.4,
    "Nike": 1.7, "Adidas": 1.6, "Puma": 1.25, "Ortuseight": 0.7, "Specs": 0.75, "League": 0.7,
    "Ventela": 0.55, "Compass": 0.95, "Ardiles": 0.4, "Yonex": 1.3, "Li-Ning": 1.1,
    "Maybelline": 1.3, "Somethinc": 1.3, "Pixy": 0.8, "Emina": 0.75, "Pinkflash": 0.6, "Marcks": 0.6,
    "Avoskin": 1.4, "Skintific": 1.2, "Garnier": 0.9, "Vaseline": 1.1, "Citra": 0.8, "Marina": 0.6,
    "Samsung": 1.2, "LG": 1.15, "Sharp": 1.0, "Polytron": 0.85, "Miyako": 0.7, "Cosmos": 0.75, "Philips": 1.2,
    "Daikin": 1.3, "Kirin": 0.7, "Electrolux": 1.1, "Maspion": 0.7,
    "Anker": 1.4, "Baseus": 1.1, "Ugreen": 1.1, "Robot": 0.6, "Vivan": 0.6, "JBL": 1.6, "Spigen": 1.5,
    "Amazfit": 1.1, "Huawei": 1.3,
    "Tupperware": 1.4, "Lock&Lock": 1.3, "Oxone": 1.1, "Lion Star": 0.7, "Bagus": 0.8,
    "IKEA": 1.2, "Informa": 1.3, "Krisbow": 0.9,
    "Pampers": 1.15, "Sweety": 0.85, "Philips Avent": 1.6, "Dr. Brown's": 1.5, "Bebelac": 1.2,
    "Lego": 1.4, "Melissa & Doug": 1.6,
    "Kettler": 1.5, "Kenko": 0.7, "Apacs": 0.6, "Spalding": 1.3, "Arei": 0.9,
    "Blackmores": 1.6, "Omron": 1.3, "Sinocare": 0.8, "OneMed": 0.7,
    "KYT": 1.0, "INK": 1.1, "NHK": 0.9, "Cargloss": 0.7, "Michelin": 1.4, "Meguiar's": 1.6, "Turtle Wax": 1.3,
}  # fmt: skip
CATEGORY_BY_SLUG: Final[dict[str, CategorySpec]] = {spec.slug: spec for spec in CATEGORIES}
FASHION_BEAUTY: Final = frozenset({"fashion-wanita", "fashion-pria", "kecantikan", "perawatan-kulit"})
GADGETS: Final = frozenset({"elektronik", "handphone", "laptop", "aksesoris-gadget"})
GROCERIES: Final = frozenset({"makanan-ringan", "minuman", "kebutuhan-dapur"})
